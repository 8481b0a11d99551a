"""Pruning, on SQLite and PostgreSQL: finished jobs after their retention (with their events, labels,
keys and message positions), finished jobs' event histories, expired idempotency keys; a batch at a time."""

from __future__ import annotations

import functools
from datetime import timedelta

from sqlalchemy import Connection, func, select, update

from conveyor import changes
from conveyor.changes import IdempotencyClaim, NewJob
from conveyor.clock import database_now
from conveyor.database import Database
from conveyor.eventlog import events_between
from conveyor.models import JOBS, IdempotencyKey, JobEventRecord, JobLabel, JobMessagePosition, JobRecord
from conveyor.outbox import record_positions
from conveyor.pruning import Pruner, keep_for, prune_event_history, prune_finished_jobs, prune_keys

from harness import write_now

PREFIX = "pruning-test"
WEEK_S = 7 * 24 * 3600.0


async def written(db: Database, change: changes.Change) -> JobRecord:
    [[result]] = (await write_now(db, PREFIX, change)).results
    assert result.job is not None, result
    return result.job


async def finished_job(db: Database, days_ago: float = 0, key: str | None = None) -> JobRecord:
    """A job with a label, a recorded message position and (if given) an idempotency key, run to
    `succeeded` (events 1 to 3), its `finished_at` moved `days_ago` into the past."""
    idempotency = IdempotencyClaim(key, "f", WEEK_S * 4) if key else None
    job = await written(
        db,
        NewJob(
            tenant="t",
            type="demo.echo",
            payload={},
            priority=3,
            max_attempts=1,
            labels={"k": "v"},
            idempotency=idempotency,
        ),
    )
    claimed = await written(db, changes.claim(job.id, "w1", lease_s=30))
    done = await written(db, changes.complete(claimed, {"ok": True}))

    def age(connection: Connection) -> None:
        finished_at = database_now(connection) - timedelta(days=days_ago)
        connection.execute(update(JOBS).where(JOBS.c.id == job.id).values(finished_at=finished_at))
        record_positions(connection, {job.id: (0, 7)})

    await db.write(age)
    return done


async def count(db: Database, table: object, job_id: str) -> int:
    def read(connection: Connection) -> int:
        column = table.job_id  # type: ignore[attr-defined]
        return int(connection.execute(select(func.count()).where(column == job_id)).scalar_one())

    return await db.read(read)


async def job_exists(db: Database, job_id: str) -> bool:
    def read(connection: Connection) -> bool:
        return connection.execute(select(JOBS.c.id).where(JOBS.c.id == job_id)).first() is not None

    return await db.read(read)


async def test_a_job_past_its_retention_goes_with_its_events_labels_key_and_position(db: Database) -> None:
    old = await finished_job(db, days_ago=8, key="old-key")
    recent = await finished_job(db, days_ago=6, key="recent-key")
    waiting = await written(db, NewJob(tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1))
    deleted = await db.write(lambda connection: prune_finished_jobs(connection, 100, keep_s=WEEK_S))
    assert deleted == 1
    assert not await job_exists(db, old.id)
    for table in (JobEventRecord, JobLabel, IdempotencyKey, JobMessagePosition):
        assert await count(db, table, old.id) == 0, table
        assert await count(db, table, recent.id) == (3 if table is JobEventRecord else 1), table
    assert await job_exists(db, recent.id) and await job_exists(db, waiting.id)


async def test_the_history_of_a_job_finished_long_ago_is_pruned_whole(db: Database) -> None:
    old = await finished_job(db, days_ago=30)
    recent = await finished_job(db)
    deleted = await db.write(lambda connection: prune_event_history(connection, 100, keep_s=WEEK_S))
    assert deleted == 1  # one job's history
    old_events = await db.read(
        functools.partial(events_between, job_id=old.id, after_seq=0, upto_seq=3, tenant="t")
    )
    assert old_events is None  # pruned: not a partial list
    assert await count(db, JobEventRecord, recent.id) == 3
    assert await job_exists(db, old.id), "the job itself stays until its retention"


async def test_expired_keys_go_and_live_ones_stay(db: Database) -> None:
    for n in range(3):
        claim = IdempotencyClaim(f"expired-{n}", "f", 0.0)
        await write_now(db, PREFIX, NewJob("t", "demo.noop", {}, 3, 1, idempotency=claim))
    await write_now(
        db, PREFIX, NewJob("t", "demo.noop", {}, 3, 1, idempotency=IdempotencyClaim("live", "f", 60))
    )
    assert await db.write(lambda connection: prune_keys(connection, 100)) == 3
    assert await db.write(lambda connection: prune_keys(connection, 100)) == 0


async def test_a_pruner_deletes_a_backlog_one_bounded_batch_at_a_time(db: Database) -> None:
    for _ in range(7):
        await finished_job(db, days_ago=10)
    batches: list[int] = []

    def step(connection: Connection, limit: int) -> int:
        deleted = prune_finished_jobs(connection, limit, keep_s=WEEK_S)
        batches.append(deleted)
        return deleted

    assert await Pruner(db, "test", step, batch=3).prune_once() == 7
    assert batches == [3, 3, 1]
    assert await Pruner(db, "test", keep_for(prune_finished_jobs, WEEK_S), batch=3).prune_once() == 0
