"""Retries and dead letters: a failed attempt is recorded with `changes.fail_attempt`.

With attempts left, the job waits as `scheduled` until its retry time, drawn from the backoff
(`conveyor.retries`: exponential, full jitter) of its type (`retry_base_s`, `retry_cap_s`), else of the
worker's settings. The retry lives in the database, so it survives any restart. With no attempts
left, `changes.fail_attempt` fails the job for good and stages its dead letter in the same write.
This policy answers every failure that no policy before it took (see `drain.py`).
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
from services.worker.attempt import Execution
from services.worker.middleware import Middleware

log = structlog.get_logger(__name__)

# How much of a traceback an error record keeps: enough to debug, small enough for the row.
MAX_TRACEBACK_CHARS = 4000
DEFAULT_BACKOFF = Backoff(base_s=DEFAULT_RETRY_BASE_S, cap_s=DEFAULT_RETRY_CAP_S)


class Retries(Middleware):
    def __init__(self, backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.backoff = backoff

    def on_failure(self, execution: Execution, exc: BaseException) -> Change:
        log.warning("job.attempt_failed", job_id=execution.job_id, attempt=execution.attempt, error=repr(exc))
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "attempt": execution.attempt,
            "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        }
        return self.attempt_failed(execution, error)

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
