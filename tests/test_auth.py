"""The one principal resolver that HTTP, WebSocket and SSE share: a key, its tenant and its scopes."""

from __future__ import annotations

import pytest

from conveyor.auth import (
    Authenticator,
    Forbidden,
    Principal,
    Unauthenticated,
    create_api_key,
    parse_bootstrap_keys,
    resolve_principal,
    revoke_api_key,
)
from conveyor.database import Database


async def test_a_key_resolves_to_its_tenant_and_scopes(db: Database) -> None:
    async with db.session() as session:
        stored = await create_api_key(session, "reader", frozenset({"read"}))
    authenticator = Authenticator(db, parse_bootstrap_keys("boot:boot-key"), cache_s=0)

    booted = await resolve_principal(authenticator, "boot-key", scope="submit")
    assert booted == Principal("boot", frozenset({"submit", "read", "cancel"}))
    assert await resolve_principal(authenticator, stored.secret, scope="read") == Principal(
        "reader", frozenset({"read"})
    )
    assert (await resolve_principal(authenticator, stored.secret)).tenant == "reader"  # no scope named


async def test_a_missing_unknown_revoked_or_unscoped_key_is_refused(db: Database) -> None:
    async with db.session() as session:
        stored = await create_api_key(session, "reader", frozenset({"read"}))
    authenticator = Authenticator(db, {}, cache_s=0)

    for missing in (None, ""):
        with pytest.raises(Unauthenticated) as refused:
            await resolve_principal(authenticator, missing, scope="read")
        assert refused.value.presented is False
    with pytest.raises(Unauthenticated) as unknown:
        await resolve_principal(authenticator, "cvk_made-up", scope="read")
    assert unknown.value.presented is True
    with pytest.raises(Forbidden) as forbidden:
        await resolve_principal(authenticator, stored.secret, scope="cancel")
    assert forbidden.value.scope == "cancel"

    async with db.session() as session:
        await revoke_api_key(session, secret=stored.secret)
    with pytest.raises(Unauthenticated):
        await resolve_principal(authenticator, stored.secret, scope="read")
