"""The job store's reads and lease writes, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools

from sqlalchemy import Connection, func, select

from conveyor import changes
from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.jobstore import expired_leases, get_job, lost_attempts, renew_leases
from conveyor.models import Job, JobRecord

from harness import write_now

PREFIX = "jobstore-test"


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
        return held, expired_leases(connection, limit=10)

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
    claimed = {
        job.id: await written(db, changes.claim(job.id, "w1", 30))
        for job in (done, requeued, reaped, retried)
    }
    await written(db, changes.complete(claimed[done.id], "ok"))
    await written(db, changes.fail_attempt(claimed[retried.id], {"type": "Boom", "message": ""}))
    await written(db, changes.expire_lease(claimed[requeued.id]))
    await written(db, changes.expire_lease(claimed[reaped.id]))
    attempts = {done.id: 1, requeued.id: 1, reaped.id: 1, retried.id: 1}
    lost = await db.read(functools.partial(lost_attempts, worker_id="w1", attempts=attempts))
    assert lost == {requeued.id, reaped.id}  # not `retried`: its own failure queued it for a retry
