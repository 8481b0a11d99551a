"""Time limits: an attempt may run for its job's `timeout_s`, else its type's; with neither, forever.

An attempt past its limit is stopped at once (no grace: its time is up; `ctx.cancelled` is set for its
cleanup) and fails with `timed_out`, retried like any failure (`retries.py`).
"""

from __future__ import annotations

import structlog

from conveyor.changes import TIMED_OUT, Change
from conveyor.handlers import JobType
from conveyor.models import JobRecord
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.middleware import Middleware
from services.worker.middleware.retries import Retries

log = structlog.get_logger(__name__)


def limit_for(job: JobRecord, job_type: JobType) -> float | None:
    """The attempt's time limit: the submission's own, else its type's; None for no limit."""
    return job.timeout_s if job.timeout_s is not None else job_type.timeout_s


class TimeLimit(Middleware):
    ending = Ending.TIMED_OUT

    def __init__(self, retries: Retries) -> None:
        self._retries = retries

    async def stop(self, execution: Execution, handler: HandlerTask) -> Change:
        timeout_s = execution.timeout_s
        if timeout_s is None:  # the executor's wait only times out where there is a limit
            raise RuntimeError(f"job {execution.job_id} timed out without a time limit")
        log.warning("job.timed_out", job_id=execution.job_id, attempt=execution.attempt, timeout_s=timeout_s)
        execution.context.cancelled.set()
        await interrupt(handler)
        await execution.progress.flush()
        error = {
            "type": TIMED_OUT,
            "message": f"the attempt ran longer than its timeout of {timeout_s:g} s",
            "attempt": execution.attempt,
        }
        return self._retries.attempt_failed(execution, error)
