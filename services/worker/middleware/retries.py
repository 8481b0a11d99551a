"""Retries and dead letters: a failed attempt is recorded with `changes.fail_attempt`.

With attempts left, the job waits as `scheduled` until its retry time, drawn from the backoff
(`conveyor.retries`: exponential, full jitter) of its type (`retry_base_s`, `retry_cap_s`), else of the
worker's settings. The retry lives in the database, so it survives any restart. With no attempts
left, `changes.fail_attempt` fails the job for good and stages its dead letter in the same write.
This policy answers every failure that no policy before it took (see `drain.py`).

The error a tenant sees is the exception's type and message, cut to `conveyor.sizes`' lengths; the
traceback stays in the worker's log (`job.attempt_failed`), where it belongs: it shows the handler's
code and data to whoever can read the job. `CONVEYOR_EXPOSE_TRACEBACKS` adds it, for development.
"""

from __future__ import annotations

import traceback
from typing import Any

import structlog

from conveyor import changes
from conveyor.changes import Change
from conveyor.handlers import JobType
from conveyor.retries import Backoff
from conveyor.settings import DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_CAP_S
from conveyor.sizes import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_TRACEBACK_CHARS,
    ResultTooLarge,
    truncated,
)
from services.worker.attempt import Execution
from services.worker.middleware import Middleware

log = structlog.get_logger(__name__)

DEFAULT_BACKOFF = Backoff(base_s=DEFAULT_RETRY_BASE_S, cap_s=DEFAULT_RETRY_CAP_S)


class Retries(Middleware):
    def __init__(self, backoff: Backoff = DEFAULT_BACKOFF, expose_tracebacks: bool = False) -> None:
        self.backoff = backoff
        self.expose_tracebacks = expose_tracebacks

    def on_failure(self, execution: Execution, exc: BaseException) -> Change:
        log.warning(
            "job.attempt_failed",
            job_id=execution.job_id,
            attempt=execution.attempt,
            error=repr(exc),
            exc_info=exc,
        )
        return self.attempt_failed(execution, error_of(exc, execution.attempt, self.expose_tracebacks))

    def attempt_failed(self, execution: Execution, error: dict[str, Any]) -> Change:
        """Fail the attempt with `error`; with attempts left, the retry waits out the type's backoff."""
        retry_at = self.backoff_for(execution.job_type).retry_at(execution.attempt)
        return changes.fail_attempt(execution.job, error, retry_at)

    def backoff_for(self, job_type: JobType | None) -> Backoff:
        """The type's own backoff where it sets one; the worker's otherwise (or if the type is unknown)."""
        if job_type is None:
            return self.backoff
        return Backoff(
            base_s=self.backoff.base_s if job_type.retry_base_s is None else job_type.retry_base_s,
            cap_s=self.backoff.cap_s if job_type.retry_cap_s is None else job_type.retry_cap_s,
        )


def error_of(exc: BaseException, attempt: int, with_traceback: bool = False) -> dict[str, Any]:
    """The job's `error` for an attempt that raised `exc`: its type and message, cut to their lengths;
    with `with_traceback`, the traceback's end as well."""
    kind = exc.error_type if isinstance(exc, ResultTooLarge) else type(exc).__name__
    error: dict[str, Any] = {
        "type": truncated(kind, MAX_ERROR_TYPE_CHARS),
        "message": truncated(str(exc), MAX_ERROR_MESSAGE_CHARS),
        "attempt": attempt,
    }
    if with_traceback:
        # The end: the frame that raised, and the exception itself.
        error["traceback"] = "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:]
    return error
