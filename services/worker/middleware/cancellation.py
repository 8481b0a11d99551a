"""Cancellation: a job canceled while it runs here is seen in the database and its handler stopped.

The cancel watch looks at the running jobs' states every `CANCEL_CHECK_INTERVAL_S` (one cheap read of
their ids), and a renewal that finds a lease ended by a cancel says so too (`leases.py`). The handler
hears of it through `ctx.cancelled` and has `cancel_grace_s` to return by itself; then it is interrupted.
Nothing is recorded for the attempt: the job is `canceled` already.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from conveyor.changes import Change
from conveyor.database import Database
from conveyor.jobstore import canceled_jobs
from conveyor.settings import DEFAULT_CANCEL_GRACE_S
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.middleware import Middleware

if TYPE_CHECKING:
    from services.worker.execution import JobExecutor

log = structlog.get_logger(__name__)

# A cancel reaches the handler within about this long: one cheap read of the running jobs' ids.
CANCEL_CHECK_INTERVAL_S = 0.5


class Cancellation(Middleware):
    ending = Ending.CANCELED

    def __init__(self, grace_s: float = DEFAULT_CANCEL_GRACE_S) -> None:
        self.grace_s = grace_s

    async def stop(self, execution: Execution, handler: HandlerTask) -> Change | None:
        """Give the handler its grace period to return by itself, then interrupt it."""
        loop = asyncio.get_running_loop()
        seen = loop.time()
        await asyncio.wait({handler}, timeout=self.grace_s)
        interrupted = not handler.done()
        if interrupted:
            log.warning(
                "job.interrupted", job_id=execution.job_id, attempt=execution.attempt, grace_s=self.grace_s
            )
            await interrupt(handler)
        log.info(
            "job.canceled",
            job_id=execution.job_id,
            attempt=execution.attempt,
            interrupted=interrupted,
            stopped_in_s=round(loop.time() - seen, 3),
        )
        await execution.progress.flush()
        return None


class CancelWatch:
    """Finds this worker's running jobs that were canceled, and has the executor tell their handlers."""

    def __init__(self, db: Database, executor: JobExecutor) -> None:
        self._db = db
        self._executor = executor

    async def check(self) -> None:
        """Look for cancels among the running jobs since the last look."""
        running = list(self._executor.running)
        if not running:
            return
        self.seen(await self._db.read(functools.partial(canceled_jobs, job_ids=running)))

    def seen(self, job_ids: Iterable[str]) -> None:
        """These jobs are canceled: cancel their attempts here (each once)."""
        for job_id in job_ids:
            attempt = self._executor.cancel(job_id)
            if attempt is not None:
                log.info("job.cancel_seen", job_id=job_id, attempt=attempt)
