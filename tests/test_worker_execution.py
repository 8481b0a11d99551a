"""The executor's endings, in-process: what each way an attempt ends writes through the committer.

Handlers here are coroutines of the test; the committer records changes instead of writing them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from conveyor.changes import HANDED_BACK, TIMED_OUT, Outcome
from conveyor.handlers import JobContext, JobType
from conveyor.jsoncodec import dumps, loads
from conveyor.lifecycle import JobState
from conveyor.sizes import MAX_PROGRESS_MESSAGE_CHARS, RESULT_TOO_LARGE
from services.worker import execution
from services.worker.execution import JobExecutor

from worker_doubles import RecordingCommitter, job_record, registry_of, until, worker_context


def executor_for(handler: Any, committer: RecordingCommitter, **settings: Any) -> JobExecutor:
    """An executor of `test.job` jobs run by `handler` (a coroutine function, or a `Blocking`)."""
    run = handler.run if isinstance(handler, Blocking) else handler
    return JobExecutor(worker_context(registry_of(JobType("test.job", run)), committer, **settings))


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [record for record in logs if record["event"] == name]


async def start_attempt(handler: Blocking) -> tuple[RecordingCommitter, JobExecutor, asyncio.Task[None]]:
    """An executor running one `test.job` attempt, once its handler has started."""
    committer = RecordingCommitter()
    executor = executor_for(handler, committer)
    running = asyncio.create_task(executor.execute(job_record()))
    await handler.started.wait()
    return committer, executor, running


async def returns_one(ctx: JobContext, payload: Any) -> int:
    return 1


@pytest.fixture
def fast_record_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outcome the database did not take is written again within milliseconds."""
    monkeypatch.setattr(execution, "RECORD_RETRY_BASE_S", 0.001)


class Blocking:
    """A handler that says when it has started, then waits for `ctx.cancelled` (or ignores it)."""

    def __init__(self, *, stubborn: bool = False, raises: bool = False) -> None:
        self.started = asyncio.Event()
        self.stubborn = stubborn
        self.raises = raises
        self.ran = False

    async def run(self, ctx: JobContext, payload: Any) -> Any:
        self.ran = True
        self.started.set()
        if self.stubborn:
            await asyncio.sleep(3600)
        await ctx.cancelled.wait()
        if self.raises:
            raise RuntimeError("stopped because told to")
        return "stopped"


async def test_a_returned_handler_completes_the_job_after_its_last_progress() -> None:
    async def handler(ctx: JobContext, payload: Any) -> dict[str, int]:
        await ctx.progress(50, "half")
        return {"n": 1}

    committer = RecordingCommitter()
    executor = executor_for(handler, committer)
    with capture_logs() as logs:
        await executor.execute(job_record())
    progress, outcome = committer.applied
    assert (progress.percent, progress.message) == (50, "half")  # type: ignore[union-attr]
    assert outcome.target is JobState.SUCCEEDED  # type: ignore[union-attr]
    # The result comes encoded (measured against CONVEYOR_MAX_RESULT_BYTES), to be stored as it is.
    assert loads(dumps(outcome.values["result"])) == {"n": 1}  # type: ignore[union-attr]
    assert outcome.attempt == 1  # type: ignore[union-attr]
    assert [record["status"] for record in events(logs, "job.recorded")] == ["succeeded"]
    assert (executor.busy, dict(executor.running), executor.slot_freed.is_set()) == (0, {}, True)


async def test_a_failed_handler_fails_the_attempt_with_its_error() -> None:
    async def handler(ctx: JobContext, payload: Any) -> None:
        raise ValueError("boom")

    committer = RecordingCommitter()
    await executor_for(handler, committer).execute(job_record())
    [outcome] = committer.outcomes
    assert outcome.target is JobState.SCHEDULED  # attempts left: the retry waits out its backoff
    # The type and message, for the tenant; the traceback is only in the worker's log.
    assert outcome.values["error"] == {"type": "ValueError", "message": "boom", "attempt": 1}


async def test_a_result_over_the_limit_fails_the_attempt_as_result_too_large() -> None:
    async def handler(ctx: JobContext, payload: Any) -> str:
        return "x" * 5000  # 5,002 bytes as JSON

    committer = RecordingCommitter()
    await executor_for(handler, committer, max_result_bytes=5001).execute(job_record())
    [outcome] = committer.outcomes
    assert outcome.target is JobState.SCHEDULED  # an attempt's failure like any other: it may retry
    assert outcome.values["error"] == {
        "type": RESULT_TOO_LARGE,
        "message": "the result is 5002 bytes as JSON, over the limit of 5001 bytes"
        " (CONVEYOR_MAX_RESULT_BYTES)",
        "attempt": 1,
    }


async def test_a_result_at_the_limit_succeeds() -> None:
    async def handler(ctx: JobContext, payload: Any) -> str:
        return "x" * 5000

    committer = RecordingCommitter()
    await executor_for(handler, committer, max_result_bytes=5002).execute(job_record())
    [outcome] = committer.outcomes
    assert outcome.target is JobState.SUCCEEDED


async def test_a_long_progress_message_is_cut_at_its_length() -> None:
    async def handler(ctx: JobContext, payload: Any) -> None:
        await ctx.progress(50, "p" * (10 * MAX_PROGRESS_MESSAGE_CHARS))

    committer = RecordingCommitter()
    await executor_for(handler, committer).execute(job_record())
    progress = committer.applied[0]
    assert len(progress.message) == MAX_PROGRESS_MESSAGE_CHARS  # type: ignore[union-attr, arg-type]
    assert progress.message.endswith("p…")  # type: ignore[union-attr]


async def test_a_job_of_an_unknown_type_fails_without_running() -> None:
    committer = RecordingCommitter()
    executor = JobExecutor(worker_context(registry_of(), committer))
    await executor.execute(job_record(type="nobody.knows"))
    [outcome] = committer.outcomes
    assert outcome.values["error"]["type"] == "UnknownJobType"
    assert executor.busy == 0


async def test_a_timed_out_attempt_is_stopped_at_once_and_fails_timed_out() -> None:
    handler = Blocking(stubborn=True)
    committer = RecordingCommitter()
    with capture_logs() as logs:
        await executor_for(handler, committer).execute(job_record(timeout_s=0.05))
    [outcome] = committer.outcomes
    assert outcome.values["error"]["type"] == TIMED_OUT
    assert outcome.values["error"]["message"] == "the attempt ran longer than its timeout of 0.05 s"
    assert [record["timeout_s"] for record in events(logs, "job.timed_out")] == [0.05]


async def test_a_canceled_attempt_that_stops_in_its_grace_records_nothing() -> None:
    handler = Blocking()
    committer, executor, running = await start_attempt(handler)
    with capture_logs() as logs:
        assert executor.cancel("job-1") == 1
        assert executor.cancel("job-1") is None, "an attempt is canceled once"
        await running
    assert committer.outcomes == []
    [canceled] = events(logs, "job.canceled")
    assert canceled["interrupted"] is False
    assert events(logs, "job.interrupted") == []


async def test_a_canceled_attempt_that_ignores_it_is_interrupted_after_the_grace() -> None:
    handler = Blocking(stubborn=True)
    committer = RecordingCommitter()
    executor = executor_for(handler, committer, cancel_grace_s=0.05)
    with capture_logs() as logs:
        running = asyncio.create_task(executor.execute(job_record()))
        await handler.started.wait()
        executor.cancel("job-1")
        await running
    assert committer.outcomes == []
    assert [record["grace_s"] for record in events(logs, "job.interrupted")] == [0.05]
    [canceled] = events(logs, "job.canceled")
    assert canceled["interrupted"] is True
    assert canceled["stopped_in_s"] >= 0.049  # the grace, to the millisecond


async def test_a_lost_attempt_is_interrupted_and_records_nothing() -> None:
    handler = Blocking(stubborn=True)
    committer, executor, running = await start_attempt(handler)
    with capture_logs() as logs:
        executor.lose("job-1", 2)  # another attempt's lease: not this one
        assert executor.holds("job-1", 1)
        executor.lose("job-1", 1)
        await running
    assert committer.outcomes == []
    assert [record["reason"] for record in events(logs, "job.abandoned")] == ["lease lost"]


async def test_a_handler_that_stops_by_raising_in_the_drain_is_handed_back() -> None:
    handler = Blocking(raises=True)
    committer, executor, running = await start_attempt(handler)
    executor.drain()
    await running
    [outcome] = committer.outcomes
    assert outcome.target is JobState.QUEUED
    assert outcome.values["error"]["type"] == HANDED_BACK
    assert outcome.values["max_attempts"] == 4, "a handed-back attempt does not count"


async def test_a_handler_still_running_when_the_drain_grace_ends_is_interrupted_and_handed_back() -> None:
    handler = Blocking(stubborn=True)
    committer, executor, running = await start_attempt(handler)
    with capture_logs() as logs:
        executor.drain()
        executor.hand_back_all()
        await running
    [outcome] = committer.outcomes
    assert outcome.values["error"]["type"] == HANDED_BACK
    assert [record["reason"] for record in events(logs, "job.interrupted")] == ["drain"]


async def test_a_handler_that_returns_in_the_drain_is_recorded_as_usual() -> None:
    handler = Blocking()
    committer, executor, running = await start_attempt(handler)
    executor.drain()
    await running
    [outcome] = committer.outcomes
    assert (outcome.target, loads(dumps(outcome.values["result"]))) == (JobState.SUCCEEDED, "stopped")


async def test_a_job_claimed_while_draining_is_handed_back_at_once() -> None:
    handler = Blocking()
    committer = RecordingCommitter()
    executor = executor_for(handler, committer)
    executor.drain()
    with capture_logs() as logs:
        await executor.execute(job_record())
    [outcome] = committer.outcomes
    assert outcome.values["error"]["type"] == HANDED_BACK
    # Not waiting out the drain's grace: interrupted before it could return.
    assert [record["reason"] for record in events(logs, "job.interrupted")] == ["drain"]


async def test_the_slot_is_free_before_the_outcome_is_committed() -> None:
    committer = RecordingCommitter()
    release = asyncio.Event()
    apply = committer.apply

    async def slow_apply(changes: Any, *, atomic: bool = False) -> Any:
        await release.wait()
        return await apply(changes, atomic=atomic)

    committer.apply = slow_apply  # type: ignore[method-assign]
    executor = executor_for(returns_one, committer)
    running = asyncio.create_task(executor.execute(job_record()))
    await executor.slot_freed.wait()
    assert executor.busy == 0
    assert "job-1" in executor.running, "the attempt is held (and renewed) until its outcome is committed"
    release.set()
    await running
    assert executor.running == {}


@pytest.mark.usefixtures("fast_record_retries")
async def test_an_outcome_the_database_did_not_take_is_written_again() -> None:
    committer = RecordingCommitter()
    committer.failures = 2
    with capture_logs() as logs:
        await executor_for(returns_one, committer).execute(job_record())
    assert [outcome.target for outcome in committer.outcomes] == [JobState.SUCCEEDED]
    assert [record["failures"] for record in events(logs, "job.record_failed")] == [1, 2]


@pytest.mark.usefixtures("fast_record_retries")
async def test_an_outcome_is_given_up_once_the_lease_is_lost() -> None:
    committer = RecordingCommitter()
    committer.failures = 1_000_000
    executor = executor_for(returns_one, committer)
    with capture_logs() as logs:
        running = asyncio.create_task(executor.execute(job_record()))
        await until(lambda: committer.calls >= 1)
        executor.lose("job-1", 1)
        await running
    assert committer.outcomes == []
    assert len(events(logs, "job.outcome_not_recorded")) == 1


async def test_an_outcome_the_database_rejects_is_void() -> None:
    committer = RecordingCommitter(outcome=Outcome.STALE)
    with capture_logs() as logs:
        await executor_for(returns_one, committer).execute(job_record())
    assert len(events(logs, "job.outcome_rejected")) == 1
    assert events(logs, "job.recorded") == []
