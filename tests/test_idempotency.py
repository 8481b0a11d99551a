"""Idempotency keys in the database, on SQLite and PostgreSQL: the unique key, the window, pruning."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from conveyor.changes import IdempotencyClaim, NewJob, Outcome
from conveyor.database import Database
from conveyor.idempotency import fingerprint, parse_key
from conveyor.models import IdempotencyKey, utcnow

from harness import write_now

DAY_S = 24 * 3600.0
PREFIX = "idempotency-test"


def keyed(tenant: str, key: str, body_fingerprint: str, window_s: float = DAY_S) -> NewJob:
    claim = IdempotencyClaim(key, body_fingerprint, window_s)
    return NewJob(tenant=tenant, type="demo.noop", payload={}, priority=3, max_attempts=1, idempotency=claim)


def test_the_fingerprint_ignores_key_order_and_whitespace_but_not_values() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({"a": [1, 2]}) != fingerprint({"a": [2, 1]})


def test_keys_are_bare_or_quoted_printable_ascii() -> None:
    assert parse_key("abc-123") == "abc-123"
    assert parse_key('"8e03978e-40d5-43e8"') == "8e03978e-40d5-43e8"
    for bad in ("", '""', "x" * 256, "caf\u00e9", "tab\there"):
        assert parse_key(bad) is None


async def test_a_live_key_holds_one_job_per_tenant(db: Database) -> None:
    first = await write_now(db, PREFIX, keyed("t", "k", fingerprint(1)))
    again = await write_now(db, PREFIX, keyed("t", "k", fingerprint(1)))
    elsewhere = await write_now(db, PREFIX, keyed("other-tenant", "k", fingerprint(1)))  # keys are per tenant
    [[created]], [[replayed]], [[other]] = first.results, again.results, elsewhere.results
    assert created.written and replayed.outcome is Outcome.REPLAYED
    assert created.job is not None and replayed.job is not None and replayed.job.id == created.job.id
    assert other.written and other.job is not None and other.job.id != created.job.id
    async with db.reading() as session:
        record = await session.get(IdempotencyKey, ("t", "k"))
    assert record is not None and record.job_id == created.job.id
    async with db.session() as session:
        session.add(
            IdempotencyKey(
                tenant="t", key="k", fingerprint="x", job_id="job-2", created_at=utcnow(), expires_at=utcnow()
            )
        )
        with pytest.raises(IntegrityError):
            await session.flush()  # the database itself refuses a second record of the key


async def test_an_expired_key_is_not_found_and_can_be_used_again(db: Database) -> None:
    [[old]] = (await write_now(db, PREFIX, keyed("t", "old", fingerprint(1), window_s=0.0))).results
    [[live]] = (await write_now(db, PREFIX, keyed("t", "live", fingerprint(1)))).results
    [[fresh]] = (await write_now(db, PREFIX, keyed("t", "old", fingerprint(2)))).results
    [[kept]] = (await write_now(db, PREFIX, keyed("t", "live", fingerprint(2)))).results
    assert fresh.written and fresh.job is not None and old.job is not None and fresh.job.id != old.job.id
    assert kept.outcome is Outcome.KEY_REUSED and live.written, "a live key keeps its first body"
