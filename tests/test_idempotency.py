"""Idempotency keys in the database, on SQLite and PostgreSQL: the unique key, the window, pruning."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from conveyor.database import Database
from conveyor.idempotency import (
    find_key,
    fingerprint,
    forget_expired_key,
    parse_key,
    prune_keys,
    remember_key,
)

DAY_S = 24 * 3600.0


def test_the_fingerprint_ignores_key_order_and_whitespace_but_not_values() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})


def test_keys_are_bare_or_quoted_printable_ascii() -> None:
    assert parse_key("abc-123") == "abc-123"
    assert parse_key('"8e03978e-40d5-43e8"') == "8e03978e-40d5-43e8"
    for bad in ("", '""', "x" * 256, "caf\u00e9", "tab\there"):
        assert parse_key(bad) is None


async def test_the_database_refuses_a_second_record_of_a_live_key(db: Database) -> None:
    async with db.session() as session:
        remember_key(session, "t", "k", fingerprint(1), "job-1", DAY_S)
    with pytest.raises(IntegrityError):
        async with db.session() as session:
            remember_key(session, "t", "k", fingerprint(1), "job-2", DAY_S)
    async with db.session() as session:
        remember_key(session, "other-tenant", "k", fingerprint(1), "job-3", DAY_S)  # keys are per tenant
    async with db.reading() as session:
        record = await find_key(session, "t", "k")
    assert record is not None and record.job_id == "job-1"


async def test_an_expired_key_is_not_found_and_can_be_used_again(db: Database) -> None:
    async with db.session() as session:
        remember_key(session, "t", "old", fingerprint(1), "job-1", window_s=0.0)
        remember_key(session, "t", "live", fingerprint(1), "job-2", DAY_S)
    async with db.session() as session:
        assert await find_key(session, "t", "old") is None
        await forget_expired_key(session, "t", "old")
        remember_key(session, "t", "old", fingerprint(2), "job-3", DAY_S)
    async with db.reading() as session:
        record = await find_key(session, "t", "old")
    assert record is not None and record.job_id == "job-3"


async def test_pruning_deletes_expired_keys_only(db: Database) -> None:
    async with db.session() as session:
        for n in range(3):
            remember_key(session, "t", f"expired-{n}", fingerprint(n), f"job-{n}", window_s=0.0)
        remember_key(session, "t", "live", fingerprint(9), "job-9", DAY_S)
    async with db.session() as session:
        assert await prune_keys(session) == 3
    async with db.session() as session:
        assert await prune_keys(session) == 0
        assert await find_key(session, "t", "live") is not None
