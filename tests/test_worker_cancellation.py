"""Cancellation: the grace a canceled handler gets, and the watch that finds cancels in the database."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from conveyor.handlers import JobContext, JobType
from services.worker.execution import JobExecutor
from services.worker.middleware.cancellation import Cancellation, CancelWatch

from worker_doubles import RecordingCommitter, execution_of, job_record, registry_of, worker_context


async def test_a_handler_that_returns_in_its_grace_is_not_interrupted() -> None:
    execution = execution_of(job_record())
    handler = asyncio.create_task(asyncio.sleep(0))
    with capture_logs() as logs:
        assert await Cancellation(grace_s=5.0).stop(execution, handler) is None
    [canceled] = [record for record in logs if record["event"] == "job.canceled"]
    assert canceled["interrupted"] is False
    assert canceled["stopped_in_s"] < 5.0


async def test_a_handler_past_its_grace_is_interrupted() -> None:
    handler = asyncio.create_task(asyncio.sleep(3600))
    with capture_logs() as logs:
        await Cancellation(grace_s=0.01).stop(execution_of(job_record()), handler)
    assert handler.cancelled()
    assert [record["event"] for record in logs] == ["job.interrupted", "job.canceled"]
    assert logs[1]["interrupted"] is True


class CanceledIn:
    """A database whose running jobs named here are canceled."""

    def __init__(self, *job_ids: str) -> None:
        self.canceled = set(job_ids)
        self.asked: list[list[str]] = []

    async def read(self, work: Any) -> set[str]:
        asked = list(work.keywords["job_ids"])
        self.asked.append(asked)
        return self.canceled & set(asked)


async def test_the_watch_cancels_the_running_jobs_canceled_in_the_database_once_each() -> None:
    started = asyncio.Event()

    async def handler(ctx: JobContext, payload: Any) -> str:
        started.set()
        await ctx.cancelled.wait()
        return "stopped"

    committer = RecordingCommitter()
    executor = JobExecutor(worker_context(registry_of(JobType("test.job", handler)), committer))
    db = CanceledIn("job-1")
    watch = CancelWatch(db, executor)  # type: ignore[arg-type]
    await watch.check()
    assert db.asked == [], "with nothing running there is nothing to ask"
    with capture_logs() as logs:
        running = asyncio.create_task(executor.execute(job_record()))
        await started.wait()
        await watch.check()
        await watch.check()
        await running
    assert [record["attempt"] for record in logs if record["event"] == "job.cancel_seen"] == [1]
    assert committer.outcomes == [], "a canceled attempt records nothing"
