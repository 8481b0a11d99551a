"""The job store's conditional writes, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import func, select

from conveyor.database import Database
from conveyor.jobstore import (
    claim_job,
    complete_job,
    expired_leases,
    fail_attempt,
    get_job,
    insert_job,
    lost_attempts,
    record_progress,
    renew_leases,
    transition,
)
from conveyor.lifecycle import JobState
from conveyor.models import Job


async def new_job(db: Database, max_attempts: int = 2) -> Job:
    async with db.session() as session:
        return await insert_job(
            session, tenant="t", type="demo.echo", payload={"a": 1}, priority=3, max_attempts=max_attempts
        )


async def test_migrations_are_idempotent(db: Database) -> None:
    await db.migrate()
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Job)) == 0


async def test_a_job_is_claimed_once(db: Database) -> None:
    job = await new_job(db)
    async with db.session() as session:
        first = await claim_job(session, job.id, "w1", lease_s=30)
    async with db.session() as session:
        second = await claim_job(session, job.id, "w2", lease_s=30)
    assert first is not None and first.status == JobState.RUNNING and first.attempts == 1
    assert first.worker_id == "w1" and first.last_seq == 2
    assert second is None


async def test_outcome_of_a_fenced_off_attempt_is_rejected(db: Database) -> None:
    job = await new_job(db)
    async with db.session() as session:
        claimed = await claim_job(session, job.id, "w1", lease_s=30)
        assert claimed is not None
        requeued = await fail_attempt(session, claimed, {"type": "LeaseExpired", "message": ""})
        assert requeued is not None and requeued.status == JobState.QUEUED
        again = await claim_job(session, job.id, "w2", lease_s=30)
        assert again is not None and again.attempts == 2
    async with db.session() as session:
        assert await complete_job(session, job.id, attempt=1, result="late") is None
        assert await record_progress(session, job.id, 1, 50.0, "late") is None
        done = await complete_job(session, job.id, attempt=2, result="ok")
    assert done is not None and done.status == JobState.SUCCEEDED and done.result == "ok"


async def test_state_never_goes_backwards(db: Database) -> None:
    job = await new_job(db)
    async with db.session() as session:
        claimed = await claim_job(session, job.id, "w1", lease_s=30)
        assert claimed is not None
        assert await complete_job(session, job.id, 1, None) is not None
        assert await transition(session, job.id, JobState.QUEUED) is None
        assert await transition(session, job.id, JobState.RUNNING) is None
        assert await claim_job(session, job.id, "w2", lease_s=30) is None
        final = await get_job(session, "t", job.id)
    assert final is not None and final.status == JobState.SUCCEEDED


async def test_last_attempt_failure_is_final(db: Database) -> None:
    job = await new_job(db, max_attempts=1)
    async with db.session() as session:
        claimed = await claim_job(session, job.id, "w1", lease_s=30)
        assert claimed is not None
        failed = await fail_attempt(session, claimed, {"type": "Boom", "message": "no"})
    assert failed is not None and failed.status == JobState.FAILED and failed.finished_at is not None
    assert failed.error == {"type": "Boom", "message": "no"}


async def test_progress_bumps_the_event_sequence(db: Database) -> None:
    job = await new_job(db)
    async with db.session() as session:
        claimed = await claim_job(session, job.id, "w1", lease_s=30)
        assert claimed is not None
        first = await record_progress(session, job.id, 1, 10.0, "a")
        assert first is not None and first.last_seq == 3
        second = await record_progress(session, job.id, 1, 20.0, "b")
    assert second is not None and second.last_seq == 4
    assert (second.progress_percent, second.progress_message) == (20.0, "b")


async def test_leases_expire_unless_renewed(db: Database) -> None:
    kept, lost = await new_job(db), await new_job(db)
    async with db.session() as session:
        assert await claim_job(session, kept.id, "w1", lease_s=0.0) is not None
        assert await claim_job(session, lost.id, "w1", lease_s=0.0) is not None
    async with db.session() as session:
        held = await renew_leases(session, "w1", {kept.id: 1, lost.id: 7}, lease_s=60)
        expired = await expired_leases(session, limit=10)
    assert held == {kept.id}  # attempt 7 is not the attempt that holds `lost`
    assert [job.id for job in expired] == [lost.id]


async def test_another_tenant_cannot_read_the_job(db: Database) -> None:
    job = await new_job(db)
    async with db.session() as session:
        assert await get_job(session, "t", job.id) is not None
        assert await get_job(session, "other", job.id) is None


async def test_an_attempt_loses_its_job_only_to_someone_else(db: Database) -> None:
    done, requeued, reaped = await new_job(db), await new_job(db), await new_job(db, max_attempts=1)
    retried = await new_job(db)
    async with db.session() as session:
        for job in (done, requeued, reaped, retried):
            assert await claim_job(session, job.id, "w1", lease_s=30) is not None
        assert await complete_job(session, done.id, 1, "ok") is not None
        own_failure = await get_job(session, "t", retried.id)
        assert own_failure is not None
        assert await fail_attempt(session, own_failure, {"type": "Boom", "message": ""}) is not None
        claimed = await get_job(session, "t", requeued.id)
        assert claimed is not None
        assert await fail_attempt(session, claimed, {"type": "LeaseExpired", "message": ""}) is not None
        last = await get_job(session, "t", reaped.id)
        assert last is not None
        assert await fail_attempt(session, last, {"type": "LeaseExpired", "message": ""}) is not None
        lost = await lost_attempts(session, "w1", {done.id: 1, requeued.id: 1, reaped.id: 1, retried.id: 1})
    assert lost == {requeued.id, reaped.id}  # not `retried`: its own failure queued it for a retry
