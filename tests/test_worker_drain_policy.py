"""The drain policy: who is handed back when a worker stops, and the drain's two waits."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.testing import capture_logs

from conveyor.changes import HANDED_BACK
from conveyor.handlers import JobContext, JobType
from conveyor.lifecycle import JobState
from services.worker.execution import JobExecutor
from services.worker.middleware.drain import Drain, drain

from worker_doubles import RecordingCommitter, execution_of, job_record, registry_of, until, worker_context


async def test_nothing_is_handed_back_before_the_drain() -> None:
    policy = Drain("w")
    execution = execution_of(job_record())
    policy.before_start(execution)
    execution.context.cancelled.set()
    assert not execution.handing_back.is_set()
    assert policy.on_failure(execution, RuntimeError("x")) is None, "an ordinary failure: for the retries"


async def test_in_the_drain_a_failure_after_being_told_is_handed_back() -> None:
    policy = Drain("w")
    policy.begin()
    told, untold = execution_of(job_record(id="told")), execution_of(job_record(id="untold"))
    told.context.cancelled.set()
    change = policy.on_failure(told, RuntimeError("x"))
    assert change is not None and change.target is JobState.QUEUED
    assert change.values["error"]["type"] == HANDED_BACK
    assert policy.on_failure(untold, RuntimeError("x")) is None


async def test_the_drain_waits_out_the_grace_then_hands_back_who_is_left() -> None:
    async def handler(ctx: JobContext, payload: Any) -> str:
        if payload["stubborn"]:
            await asyncio.sleep(3600)
        await ctx.cancelled.wait()
        return "finished"

    committer = RecordingCommitter()
    executor = JobExecutor(worker_context(registry_of(JobType("test.job", handler)), committer))
    jobs: set[asyncio.Task[None]] = set()
    for job_id, stubborn in (("cooperative", False), ("stubborn", True)):
        task = asyncio.create_task(executor.execute(job_record(id=job_id, payload={"stubborn": stubborn})))
        jobs.add(task)
        task.add_done_callback(jobs.discard)
    await until(lambda: len(executor.running) == 2)
    with capture_logs() as logs:
        await drain(executor, jobs, grace_s=0.05)
    outcomes = {change.job_id: change for change in committer.outcomes}
    assert outcomes["cooperative"].target is JobState.SUCCEEDED
    assert outcomes["stubborn"].values["error"]["type"] == HANDED_BACK
    assert [record["jobs"] for record in logs if record["event"] == "worker.handing_back"] == [1]
    assert jobs == set()
