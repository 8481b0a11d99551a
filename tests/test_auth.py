"""The one principal resolver that HTTP, WebSocket and SSE share: a key, its tenant and its scopes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from conveyor.auth import (
    ALL_SCOPES,
    PRINCIPAL_CACHE_S,
    Authenticator,
    Forbidden,
    InvalidBootstrapKeys,
    Principal,
    Unauthenticated,
    create_api_key,
    hash_key,
    parse_bootstrap_keys,
    resolve_principal,
    revoke_api_key,
)
from conveyor.database import Database

LONG_KEY = "boot-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
THIRD_KEY = "third-key-0123456789abcdef"
# A service refuses bad keys before it connects to anything: this is ample.
STARTUP_REFUSAL_TIMEOUT_S = 30


async def test_a_key_resolves_to_its_tenant_and_scopes(db: Database) -> None:
    async with db.session() as session:
        stored = await create_api_key(session, "reader", frozenset({"read"}))
    authenticator = Authenticator(db, parse_bootstrap_keys(f"boot:{LONG_KEY}"), cache_s=0)

    booted = await resolve_principal(authenticator, LONG_KEY, scope="submit")
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


def test_bootstrap_keys_may_name_their_scopes() -> None:
    keys = parse_bootstrap_keys(f"ops:{LONG_KEY}, reader:{OTHER_KEY}:read, feeder:{THIRD_KEY}:submit+read")
    assert keys[hash_key(LONG_KEY)] == Principal("ops", ALL_SCOPES)  # no scopes named: all of them
    assert keys[hash_key(OTHER_KEY)] == Principal("reader", frozenset({"read"}))
    assert keys[hash_key(THIRD_KEY)] == Principal("feeder", frozenset({"submit", "read"}))


@pytest.mark.parametrize(
    "spec",
    [
        "acme:short-key-1234567",  # 23 characters
        f"acme:{LONG_KEY}:submit+delete",
        f"acme:{LONG_KEY}:",  # a trailing colon names no scope: refused rather than read as all of them
        f":{LONG_KEY}",
        "acme",
    ],
)
def test_malformed_or_short_bootstrap_keys_are_refused_without_showing_the_key(spec: str) -> None:
    with pytest.raises(InvalidBootstrapKeys) as refused:
        parse_bootstrap_keys(f"ok:{OTHER_KEY},{spec}")
    message = str(refused.value)
    assert "CONVEYOR_API_KEYS entry 2" in message
    for secret in ("short-key-1234567", LONG_KEY, OTHER_KEY):
        assert secret not in message


def test_a_service_will_not_start_on_a_short_bootstrap_key(tmp_path: Path) -> None:
    short = "a-short-secret-key"
    env = {
        **os.environ,
        "CONVEYOR_API_KEYS": f"acme:{short}",
        "CONVEYOR_KAFKA_BOOTSTRAP": "127.0.0.1:9",  # never reached: the keys are checked first
        "CONVEYOR_DATA_DIR": str(tmp_path),
    }
    for command in ("gateway", "progress"):
        done = subprocess.run(
            [sys.executable, "-m", "conveyor", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=STARTUP_REFUSAL_TIMEOUT_S,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert "CONVEYOR_API_KEYS" in output and "at least 24" in output
        assert short not in output


@contextmanager
def key_queries() -> Iterator[list[str]]:
    """The statements every engine of this process sends that read the stored keys, while open."""
    statements: list[str] = []

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "api_keys" in statement:
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", on_statement)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", on_statement)


# Long enough for the copy of the stored keys to go stale (and be read again) twice.
FLOOD_S = 2.5 * PRINCIPAL_CACHE_S
FLOOD_WIDTH = 200


async def test_a_flood_of_unknown_keys_costs_a_query_a_second_at_most(db: Database) -> None:
    async with db.session() as session:
        stored = await create_api_key(session, "reader", frozenset({"read"}))
    authenticator = Authenticator(db, {})

    async def refused(token: str) -> bool:
        try:
            await resolve_principal(authenticator, token, scope="read")
        except Unauthenticated:
            return True
        return False

    with key_queries() as queries:
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < FLOOD_S:
            made_up = [f"cvk_made-up-{rounds}-{n}" for n in range(FLOOD_WIDTH)]
            same = ["cvk_the-same-wrong-key"] * FLOOD_WIDTH
            answers = await asyncio.gather(*(refused(token) for token in made_up + same))
            assert all(answers)
            assert (await resolve_principal(authenticator, stored.secret)).tenant == "reader"
            rounds += 1
            await asyncio.sleep(0.05)  # paces the flood over FLOOD_S; nothing waits on a race
        elapsed = time.monotonic() - started
    assert rounds * FLOOD_WIDTH * 2 > 1000
    assert 1 <= len(queries) <= elapsed / PRINCIPAL_CACHE_S + 1, (
        f"{len(queries)} key queries in {elapsed:.1f} s"
    )
