"""API keys: bootstrap keys from settings and keys stored (hashed) in the database."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.models import ApiKey, utcnow

ALL_SCOPES = frozenset({"submit", "read", "cancel"})
KEY_PREFIX = "cvk_"


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_bootstrap_keys(spec: str) -> dict[str, Principal]:
    """`tenant:key,tenant:key` -> {hash of key: principal with every scope}."""
    keys: dict[str, Principal] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"CONVEYOR_API_KEYS entries are tenant:key, got {item!r}")
        keys[hash_key(key.strip())] = Principal(tenant.strip(), ALL_SCOPES)
    return keys


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(
    session: AsyncSession, bootstrap_keys: dict[str, Principal], token: str
) -> Principal | None:
    digest = hash_key(token)
    for known, principal in bootstrap_keys.items():
        if hmac.compare_digest(known, digest):
            return principal
    row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(row.tenant, frozenset(row.scopes.split(",")))


@dataclass(frozen=True)
class NewApiKey:
    """A key just created: `secret` is shown once, `id` names it later (to list or revoke it)."""

    id: int
    secret: str


class UnknownApiKey(LookupError):
    """No key in the database has this id or this secret."""


@dataclass(frozen=True)
class Revocation:
    key: ApiKey
    already_revoked: bool


async def create_api_key(
    session: AsyncSession, tenant: str, scopes: frozenset[str], name: str = ""
) -> NewApiKey:
    unknown = scopes - ALL_SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    secret = generate_key()
    row = ApiKey(
        tenant=tenant,
        name=name,
        key_hash=hash_key(secret),
        scopes=",".join(sorted(scopes)),
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return NewApiKey(row.id, secret)


async def revoke_api_key(
    session: AsyncSession, *, key_id: int | None = None, secret: str | None = None
) -> Revocation:
    """Revoke the key with this id or this secret (exactly one of them); revoking twice keeps the first time.

    `authenticate` reads the database on every request, so the key is refused from the next request on.
    Keys from CONVEYOR_API_KEYS are not in the database: they are revoked by removing them from the setting.
    """
    if key_id is not None and secret is None:
        query = select(ApiKey).where(ApiKey.id == key_id)
        what = f"id {key_id}"
    elif secret is not None and key_id is None:
        query = select(ApiKey).where(ApiKey.key_hash == hash_key(secret))
        what = "this secret"
    else:
        raise ValueError("name the key by its id or by its secret (exactly one)")
    row = await session.scalar(query.with_for_update())
    if row is None:
        raise UnknownApiKey(f"no API key with {what}")
    if row.revoked_at is not None:
        return Revocation(row, already_revoked=True)
    row.revoked_at = utcnow()
    await session.flush()
    return Revocation(row, already_revoked=False)


async def list_api_keys(session: AsyncSession, tenant: str | None = None) -> list[ApiKey]:
    """The stored keys, oldest first, revoked ones included (with their `revoked_at`)."""
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return list(await session.scalars(query))
