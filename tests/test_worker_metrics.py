"""The metrics policy: attempts started, ended by ending, and their duration, in the default registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from conveyor.handlers import JobContext, JobType
from services.worker.execution import JobExecutor

from worker_doubles import RecordingCommitter, job_record, registry_of, worker_context


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_attempts_are_counted_by_how_they_ended() -> None:
    async def handler(ctx: JobContext, payload: Any) -> None:
        if payload.get("fail"):
            raise ValueError("boom")

    executor = JobExecutor(worker_context(registry_of(JobType("test.job", handler)), RecordingCommitter()))
    started = sample("conveyor_worker_attempts_started_total")
    returned = sample("conveyor_worker_attempts_ended_total", ending="returned")
    not_started = sample("conveyor_worker_attempts_ended_total", ending="not_started")
    durations = sample("conveyor_worker_attempt_duration_seconds_count", ending="returned")
    await executor.execute(job_record())
    await executor.execute(job_record(payload={"fail": True}))  # a failure still returned from its wait
    await executor.execute(job_record(type="nobody.knows"))
    assert sample("conveyor_worker_attempts_started_total") == started + 3
    assert sample("conveyor_worker_attempts_ended_total", ending="returned") == returned + 2
    assert sample("conveyor_worker_attempts_ended_total", ending="not_started") == not_started + 1
    assert sample("conveyor_worker_attempt_duration_seconds_count", ending="returned") == durations + 2
