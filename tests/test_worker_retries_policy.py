"""The retry policy: a failure's error record, its backoff (the type's, else the worker's), and the end
of the line once attempts are spent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from structlog.testing import capture_logs

from conveyor.handlers import JobType
from conveyor.lifecycle import JobState
from conveyor.models import utcnow
from conveyor.retries import Backoff
from conveyor.sizes import MAX_ERROR_MESSAGE_CHARS, MAX_ERROR_TYPE_CHARS, MAX_TRACEBACK_CHARS
from services.worker.middleware.retries import Retries

from worker_doubles import execution_of, job_record

WORKER_BACKOFF = Backoff(base_s=2.0, cap_s=8.0)


async def noop(ctx: Any, payload: Any) -> None:
    return None


async def test_a_failure_with_attempts_left_waits_out_the_backoff() -> None:
    before = utcnow()
    change = Retries(WORKER_BACKOFF).on_failure(execution_of(job_record(attempts=2)), ValueError("boom"))
    assert change.target is JobState.SCHEDULED
    assert change.attempt == 2
    # Full jitter after the second attempt: anywhere in [0, base * 2].
    assert before <= change.values["run_at"] <= utcnow() + timedelta(seconds=4.0)
    assert change.values["error"] == {"type": "ValueError", "message": "boom", "attempt": 2}


async def test_the_traceback_goes_to_the_workers_log_not_to_the_tenant() -> None:
    def raise_deep() -> None:
        raise ValueError("boom")

    try:
        raise_deep()
    except ValueError as exc:
        error = exc
    with capture_logs() as logs:
        change = Retries(WORKER_BACKOFF).on_failure(execution_of(job_record()), error)
    assert change.values["error"] == {"type": "ValueError", "message": "boom", "attempt": 1}
    [record] = [record for record in logs if record["event"] == "job.attempt_failed"]
    # The log line carries the exception itself: the renderer writes its traceback (`format_exc_info`).
    assert record["exc_info"] is error and error.__traceback__ is not None


async def test_an_error_message_and_type_are_cut_at_their_lengths() -> None:
    long_type = type("E" * (2 * MAX_ERROR_TYPE_CHARS), (Exception,), {})
    change = Retries(WORKER_BACKOFF).on_failure(
        execution_of(job_record()), long_type("m" * (10 * MAX_ERROR_MESSAGE_CHARS))
    )
    error = change.values["error"]
    assert len(error["message"]) == MAX_ERROR_MESSAGE_CHARS and error["message"].endswith("m…")
    assert len(error["type"]) == MAX_ERROR_TYPE_CHARS and error["type"].endswith("E…")


async def test_the_last_attempt_fails_the_job_for_good() -> None:
    change = Retries(WORKER_BACKOFF).on_failure(
        execution_of(job_record(attempts=3, max_attempts=3)), ValueError("boom")
    )
    assert change.target is JobState.FAILED  # `changes.fail_attempt` stages the dead letter with it
    assert change.values["finished_at"] is not None


async def test_an_exposed_long_traceback_keeps_its_end() -> None:
    try:
        raise ValueError("x" * 2 * MAX_TRACEBACK_CHARS + " the end")
    except ValueError as exc:
        error = exc
    change = Retries(WORKER_BACKOFF, expose_tracebacks=True).on_failure(execution_of(job_record()), error)
    traceback = change.values["error"]["traceback"]
    assert len(traceback) == MAX_TRACEBACK_CHARS
    assert traceback.endswith("x the end\n")


def test_a_type_may_set_its_own_backoff_in_part() -> None:
    retries = Retries(WORKER_BACKOFF)
    assert retries.backoff_for(None) == WORKER_BACKOFF
    assert retries.backoff_for(JobType("t", noop)) == WORKER_BACKOFF
    assert retries.backoff_for(JobType("t", noop, retry_base_s=0.5)) == Backoff(base_s=0.5, cap_s=8.0)
    assert retries.backoff_for(JobType("t", noop, retry_cap_s=1.0)) == Backoff(base_s=2.0, cap_s=1.0)


async def test_the_type_backoff_applies_to_its_failures() -> None:
    job_type = JobType("t", noop, retry_base_s=0.0, retry_cap_s=0.0)
    change = Retries(WORKER_BACKOFF).on_failure(execution_of(job_record(), job_type), ValueError("boom"))
    assert change.values["run_at"] <= utcnow()
