"""The lease policy: renewals, a lost lease, giving up a stale lease, the reaper, and telling when the
database is lost. The keeper asks the executor to change its attempts; it changes none itself."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from conveyor.changes import LEASE_EXPIRED, Outcome
from conveyor.handlers import JobContext, JobType
from services.worker.execution import JobExecutor
from services.worker.middleware.cancellation import CancelWatch
from services.worker.middleware.leases import LeaseKeeper, LostLease

from worker_doubles import RecordingCommitter, execution_of, job_record, registry_of, until, worker_context


class Renewals:
    """A database whose lease renewal answers (held, missed, lost, canceled) as set by the test."""

    def __init__(self) -> None:
        self.answer: tuple[set[str], dict[str, int], set[str], set[str]] = (set(), {}, set(), set())
        self.expired: list[Any] = []

    async def write(self, work: Any) -> Any:
        return self.answer

    async def read(self, work: Any) -> Any:
        return self.expired


class Running:
    """One job running in a real executor, its handler waiting until told to stop (or, stubborn, until
    interrupted: a handler that returned by itself would be recorded, the write fenced by its lease)."""

    def __init__(self, *, stubborn: bool = False, **settings: Any) -> None:
        self.stubborn = stubborn
        self.started = asyncio.Event()
        self.committer = RecordingCommitter()
        self.db = Renewals()
        context = worker_context(
            registry_of(JobType("test.job", self.handler)), self.committer, db=self.db, **settings
        )
        self.executor = JobExecutor(context)
        self.keeper = LeaseKeeper(context, self.executor, CancelWatch(context.db, self.executor))
        self.task: asyncio.Task[None] | None = None

    async def handler(self, ctx: JobContext, payload: Any) -> str:
        self.started.set()
        if self.stubborn:
            await asyncio.sleep(3600)
        await ctx.cancelled.wait()
        return "stopped"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.executor.execute(job_record()))
        await self.started.wait()

    async def ended(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


async def test_a_renewed_lease_counts_from_when_the_renewal_was_asked() -> None:
    job = Running()
    await job.start()
    job.db.answer = ({"job-1"}, {}, set(), set())
    before = job.executor.running["job-1"].renewed_at
    await job.keeper.renew()
    assert job.executor.running["job-1"].renewed_at >= before
    job.executor.cancel("job-1")
    await job.ended()


async def test_a_lease_found_lost_stops_the_attempt_and_records_nothing() -> None:
    job = Running(stubborn=True)
    await job.start()
    job.db.answer = (set(), {"job-1": 1}, {"job-1"}, set())
    with capture_logs() as logs:
        await job.keeper.renew()
        await job.ended()
    assert [(record["event"], record["attempt"]) for record in logs if record["event"] == "lease.lost"] == [
        ("lease.lost", 1)
    ]
    assert job.committer.outcomes == []


async def test_a_lease_ended_by_a_cancel_is_a_cancel_not_a_lost_lease() -> None:
    job = Running()
    await job.start()
    job.db.answer = (set(), {"job-1": 1}, {"job-1"}, {"job-1"})
    with capture_logs() as logs:
        await job.keeper.renew()
        await job.ended()
    names = [record["event"] for record in logs]
    assert "job.cancel_seen" in names and "job.canceled" in names
    assert "lease.lost" not in names


async def test_a_lease_unrenewed_for_most_of_its_length_is_given_up() -> None:
    job = Running(stubborn=True, lease_s=0.5)
    await job.start()
    with capture_logs() as logs:
        job.keeper.give_up_stale_leases()
        assert job.executor.holds("job-1", 1), "fresh from its claim"
        await until(lambda: (job.keeper.give_up_stale_leases(), job.task.done())[1])  # type: ignore[union-attr]
    [given_up] = [record for record in logs if record["event"] == "lease.given_up"]
    assert given_up["silent_s"] >= 0.375, "three quarters of the lease"  # (rounded to the millisecond)
    assert job.committer.outcomes == []


async def test_every_attempt_is_given_up_when_the_heartbeat_goes_unwritten_for_most_of_dead_after() -> None:
    job = Running(stubborn=True, worker_dead_after_s=0.4)
    await job.start()
    job.keeper.give_up_stale_leases()
    assert job.executor.holds("job-1", 1), "no heartbeat yet: the reapers go by the lease, still fresh"
    await job.keeper.beat()
    with capture_logs() as logs:
        await until(lambda: (job.keeper.give_up_stale_leases(), job.task.done())[1])  # type: ignore[union-attr]
    [given_up] = [record for record in logs if record["event"] == "lease.given_up"]
    assert given_up["reason"] == "heartbeat"
    assert given_up["silent_s"] >= 0.3, "three quarters of CONVEYOR_WORKER_DEAD_AFTER_S"
    assert job.committer.outcomes == []


async def test_the_reaper_sends_a_job_it_takes_over_to_a_partition_of_its_own() -> None:
    job = Running(worker_dead_after_s=4.0)
    job.keeper.partition_for = lambda topic, job_id: 2 if topic.endswith(".jobs.p3") else None
    job.db.expired = [job_record(id="job-9", attempts=1, priority=3, worker_id="gone")]
    await job.keeper.reap()
    [change] = job.committer.outcomes
    assert (change.partition, change.abandoned_after_s) == (2, 4.0)


async def test_the_database_is_lost_after_a_long_silence_and_found_by_the_reaper() -> None:
    job = Running(lease_s=0.1)
    assert job.keeper.database_lost, "nothing has been heard from it yet"
    await job.keeper.reap()
    assert not job.keeper.database_lost


async def test_the_reaper_fails_each_expired_lease_attempt() -> None:
    job = Running()
    job.db.expired = [job_record(id="job-9", attempts=1, worker_id="gone")]
    with capture_logs() as logs:
        await job.keeper.reap()
    [change] = job.committer.outcomes
    assert (change.job_id, change.values["error"]["type"]) == ("job-9", LEASE_EXPIRED)
    assert [record["worker"] for record in logs if record["event"] == "lease.expired"] == ["gone"]


async def test_the_reaper_logs_only_the_expiries_it_wrote() -> None:
    job = Running()
    job.committer.outcome = Outcome.STALE
    job.db.expired = [job_record(id="job-9")]
    with capture_logs() as logs:
        await job.keeper.reap()
    assert [record for record in logs if record["event"] == "lease.expired"] == []


async def test_a_lost_lease_interrupts_the_handler_at_once() -> None:
    handler = asyncio.create_task(asyncio.sleep(3600))
    with capture_logs() as logs:
        assert await LostLease().stop(execution_of(job_record()), handler) is None
    assert handler.cancelled()
    assert [record["reason"] for record in logs if record["event"] == "job.abandoned"] == ["lease lost"]
