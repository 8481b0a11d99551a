"""API keys: bootstrap keys from settings and keys stored (hashed) in the database, and the one
resolver every transport (HTTP, WebSocket, SSE) asks who a presented key belongs to."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.database import Database
from conveyor.memo import Remembered
from conveyor.models import ApiKey, utcnow

ALL_SCOPES = frozenset({"submit", "read", "cancel"})
KEY_PREFIX = "cvk_"
# A bootstrap key shorter than this is refused at startup: a guessable key is a tenant's for anyone.
MIN_BOOTSTRAP_KEY_LENGTH = 24
BOOTSTRAP_KEYS_SETTING = "CONVEYOR_API_KEYS"
# Between a bootstrap key's scopes: `tenant:key:submit+read`.
SCOPE_SEPARATOR = "+"
# How long a process trusts its copy of the stored keys: a key created or revoked in the database
# takes effect within this long, and the keys cost one query this often at most, however many
# requests (with real or made-up keys) arrive meanwhile.
PRINCIPAL_CACHE_S = 1.0


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[str]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class InvalidBootstrapKeys(ValueError):
    """CONVEYOR_API_KEYS is malformed. The message names the entry by position and tenant, never the key."""


def parse_bootstrap_keys(spec: str) -> dict[str, Principal]:
    """`tenant:key,tenant:key:submit+read` -> {hash of key: principal}: the scopes named, else every
    scope. A key must be at least MIN_BOOTSTRAP_KEY_LENGTH characters (and holds no `:` or `,`)."""
    keys: dict[str, Principal] = {}
    for n, item in enumerate(spec.split(","), start=1):
        item = item.strip()
        if not item:
            continue
        tenant, _, rest = (part.strip() for part in item.partition(":"))
        key, scoped, scopes = (part.strip() for part in rest.partition(":"))
        where = f"{BOOTSTRAP_KEYS_SETTING} entry {n}" + (f" (tenant {tenant!r})" if tenant else "")
        if not tenant or not key:
            raise InvalidBootstrapKeys(f"{where}: entries are tenant:key or tenant:key:scope+scope")
        if len(key) < MIN_BOOTSTRAP_KEY_LENGTH:
            raise InvalidBootstrapKeys(
                f"{where}: the key has {len(key)} characters; at least {MIN_BOOTSTRAP_KEY_LENGTH}"
            )
        if scoped and not scopes:
            raise InvalidBootstrapKeys(f"{where}: name scopes after the second `:`, or leave it out for all")
        keys[hash_key(key)] = Principal(tenant, bootstrap_scopes(scopes, where))
    return keys


def bootstrap_scopes(spec: str, where: str) -> frozenset[str]:
    """`submit+read` -> those scopes; nothing named -> every scope (as before scopes could be named)."""
    if not spec:
        return ALL_SCOPES
    scopes = frozenset(scope.strip() for scope in spec.split(SCOPE_SEPARATOR))
    unknown = scopes - ALL_SCOPES
    if unknown:
        # Not named: with a `:` in a key by mistake, the "scope" would be part of the key.
        known = SCOPE_SEPARATOR.join(sorted(ALL_SCOPES))
        raise InvalidBootstrapKeys(f"{where}: {len(unknown)} unknown scope(s); the scopes are {known}")
    return scopes


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def live_keys(connection: Connection) -> dict[str, Principal]:
    """Every stored key that is not revoked: {hash of key: principal}."""
    query = select(ApiKey.key_hash, ApiKey.tenant, ApiKey.scopes).where(ApiKey.revoked_at.is_(None))
    return {
        row.key_hash: Principal(row.tenant, frozenset(row.scopes.split(",")))
        for row in connection.execute(query)
    }


class Authenticator:
    """Who an API key belongs to: a bootstrap key (CONVEYOR_API_KEYS) or a key stored in the database.

    The stored keys are read whole, at most once per PRINCIPAL_CACHE_S and only when a request needs
    them (`conveyor.memo`). A lookup per presented key, even one remembered for a while, would let a
    flood of made-up keys cost a query each; a copy of the (few) live keys answers every key, known or
    not, from memory."""

    def __init__(
        self, db: Database, bootstrap_keys: dict[str, Principal], cache_s: float = PRINCIPAL_CACHE_S
    ):
        self._bootstrap_keys = bootstrap_keys
        self._stored = Remembered(functools.partial(db.read, live_keys), cache_s)

    async def principal(self, token: str) -> Principal | None:
        """The key's principal; None for an unknown or revoked key."""
        digest = hash_key(token)
        for known, principal in self._bootstrap_keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        stored = await self._stored.get()
        return stored.get(digest)


class Unauthenticated(Exception):
    """No key was presented (`presented` False), or the key is unknown or revoked."""

    def __init__(self, *, presented: bool) -> None:
        super().__init__("unknown or revoked API key" if presented else "no API key presented")
        self.presented = presented


class Forbidden(Exception):
    """The key is valid but lacks `scope`."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"this API key lacks the {scope!r} scope")
        self.scope = scope


async def resolve_principal(
    authenticator: Authenticator, token: str | None, *, scope: str | None = None
) -> Principal:
    """The principal of a presented key, holding `scope` when one is named. Raises `Unauthenticated`
    or `Forbidden`; each transport turns them into its own answer (a problem, a close code)."""
    if not token:
        raise Unauthenticated(presented=False)
    principal = await authenticator.principal(token)
    if principal is None:
        raise Unauthenticated(presented=True)
    if scope is not None and scope not in principal.scopes:
        raise Forbidden(scope)
    return principal


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

    Services remember a key's lookup for PRINCIPAL_CACHE_S, so the key is refused within that long.
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
