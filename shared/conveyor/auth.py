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


async def create_api_key(session: AsyncSession, tenant: str, scopes: frozenset[str], name: str = "") -> str:
    unknown = scopes - ALL_SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    key = generate_key()
    session.add(
        ApiKey(
            tenant=tenant,
            name=name,
            key_hash=hash_key(key),
            scopes=",".join(sorted(scopes)),
            created_at=utcnow(),
        )
    )
    await session.flush()
    return key
