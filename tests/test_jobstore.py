"""The job store's reads and lease writes, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Connection, func, select, update

from conveyor import changes
from conveyor.changes import NewJob, Outcome
from conveyor.clock import database_now, skew_process_clock
from conveyor.database import Database
from conveyor.jobstore import abandoned_jobs, beat, forget_worker, get_job, lost_attempts, renew_leases
from conveyor.models import WORKER_HEARTBEATS, Job, JobRecord

from harness import write_now

PREFIX = "jobstore-test"
DEAD_AFTER_S = 4.0


async def written(db: Database, change: changes.Change) -> JobRecord:
    [[result]] = (await write_now(db, PREFIX, change)).results
    assert result.job is not None, result
    return result.job


async def new_job(db: Database, max_attempts: int = 2) -> JobRecord:
    return await written(
        db, NewJob(tenant="t", type="demo.echo", payload={"a": 1}, priority=3, max_attempts=max_attempts)
    )


async def test_migrations_are_idempotent(db: Database) -> None:
    await db.migrate()
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Job)) == 0


async def test_leases_expire_unless_renewed(db: Database) -> None:
    kept, lost = await new_job(db), await new_job(db)
    await written(db, changes.claim(kept.id, "w1", lease_s=0.0))
    await written(db, changes.claim(lost.id, "w1", lease_s=0.0))

    def renew_then_look(connection: Connection) -> tuple[set[str], list[JobRecord]]:
        held = renew_leases(connection, "w1", {kept.id: 1, lost.id: 7}, lease_s=60)
        return held, abandoned_jobs(connection, limit=10, dead_after_s=DEAD_AFTER_S)

    held, expired = await db.write(renew_then_look)
    assert held == {kept.id}  # attempt 7 is not the attempt that holds `lost`
    assert [job.id for job in expired] == [lost.id]


async def test_another_tenant_cannot_read_the_job(db: Database) -> None:
    job = await new_job(db)
    assert await db.read(functools.partial(get_job, tenant="t", job_id=job.id)) is not None
    assert await db.read(functools.partial(get_job, tenant="other", job_id=job.id)) is None


async def test_an_attempt_loses_its_job_only_to_someone_else(db: Database) -> None:
    done, requeued, reaped = await new_job(db), await new_job(db), await new_job(db, max_attempts=1)
    retried = await new_job(db)
    # w1's leases on `requeued` and `reaped` have run out (it keeps no heartbeat): the reaper takes them.
    claimed = {
        job.id: await written(db, changes.claim(job.id, "w1", 0.0 if job in (requeued, reaped) else 30))
        for job in (done, requeued, reaped, retried)
    }
    await written(db, changes.complete(claimed[done.id], "ok"))
    await written(db, changes.fail_attempt(claimed[retried.id], {"type": "Boom", "message": ""}))
    await written(db, changes.expire_lease(claimed[requeued.id], DEAD_AFTER_S))
    await written(db, changes.expire_lease(claimed[reaped.id], DEAD_AFTER_S))
    attempts = {done.id: 1, requeued.id: 1, reaped.id: 1, retried.id: 1}
    lost = await db.read(functools.partial(lost_attempts, worker_id="w1", attempts=attempts))
    assert lost == {requeued.id, reaped.id}  # not `retried`: its own failure queued it for a retry


async def heartbeat_of(db: Database, worker_id: str, age_s: float) -> None:
    """`worker_id`'s heartbeat, written `age_s` ago by the database's clock."""

    def write(connection: Connection) -> None:
        beat(connection, worker_id)
        at = database_now(connection) - timedelta(seconds=age_s)
        row = WORKER_HEARTBEATS.c.worker_id == worker_id
        connection.execute(update(WORKER_HEARTBEATS).where(row).values(heartbeat_at=at))

    await db.write(write)


async def abandoned(db: Database) -> set[str]:
    jobs = await db.read(functools.partial(abandoned_jobs, limit=100, dead_after_s=DEAD_AFTER_S))
    return {job.id for job in jobs}


async def test_a_dead_workers_jobs_are_abandoned_long_before_their_leases_end(db: Database) -> None:
    on_dead, on_live = await new_job(db), await new_job(db)
    await heartbeat_of(db, "dead", age_s=DEAD_AFTER_S + 1)
    await heartbeat_of(db, "live", age_s=0)
    await written(db, changes.claim(on_dead.id, "dead", lease_s=600))
    await written(db, changes.claim(on_live.id, "live", lease_s=600))
    assert await abandoned(db) == {on_dead.id}

    # A worker that stopped cleanly took its heartbeat away: its leases alone say whether it is gone.
    await db.write(functools.partial(forget_worker, worker_id="dead"))
    assert await abandoned(db) == set()


async def test_the_reaper_leaves_an_attempt_whose_worker_came_back_after_it_looked(db: Database) -> None:
    """A renewal or a heartbeat committed between the reaper's look and its update keeps the attempt:
    the update itself checks again that the attempt is abandoned."""
    renewed, beating = await new_job(db), await new_job(db)
    renewed_job = await written(db, changes.claim(renewed.id, "w1", lease_s=0.0))
    await heartbeat_of(db, "w2", age_s=DEAD_AFTER_S + 1)
    beating_job = await written(db, changes.claim(beating.id, "w2", lease_s=600))
    assert await abandoned(db) == {renewed.id, beating.id}

    await db.write(functools.partial(renew_leases, worker_id="w1", attempts={renewed.id: 1}, lease_s=60))
    await heartbeat_of(db, "w2", age_s=0)
    results = await write_now(
        db,
        PREFIX,
        changes.expire_lease(renewed_job, DEAD_AFTER_S),
        changes.expire_lease(beating_job, DEAD_AFTER_S),
    )
    assert [result.outcome for result in results.results[0]] == [Outcome.STALE, Outcome.STALE]
    for job in (renewed, beating):
        now = await db.read(functools.partial(get_job, tenant="t", job_id=job.id))
        assert now is not None and (now.status, now.attempts) == ("running", 1)


@pytest.fixture
def clock_ten_minutes_ahead() -> Iterator[None]:
    skew_process_clock(600)
    yield
    skew_process_clock(0)


@pytest.mark.usefixtures("clock_ten_minutes_ahead")
async def test_leases_are_set_and_compared_by_the_databases_clock_not_the_processs(db: Database) -> None:
    """A process whose clock runs ten minutes ahead neither writes leases that outlast their length
    nor reaps leases that are still running."""
    job = await new_job(db)
    claimed = await written(db, changes.claim(job.id, "w1", lease_s=60))
    assert claimed.lease_expires_at is not None
    lease_left = claimed.lease_expires_at - await db.read(database_now)
    assert timedelta(seconds=50) < lease_left <= timedelta(seconds=60)
    assert await abandoned(db) == set()
