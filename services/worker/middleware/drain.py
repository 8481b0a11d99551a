"""The drain: on SIGTERM a worker finishes what it can and hands the rest back.

The worker stops reading, and every running handler is told (`ctx.cancelled`) and given the drain's
grace period (`drain_grace_s`) to finish. A handler that returns is recorded as usual; one that stops by
raising after it was told, or is still running when the grace ends (it is interrupted then), is handed
back: queued again at once for another worker, rather than after its lease runs out, and without using
up one of the job's attempts. A job claimed while the worker drains is handed back without starting.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from conveyor import changes
from conveyor.changes import Change
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.middleware import Middleware

if TYPE_CHECKING:
    from services.worker.execution import JobExecutor

log = structlog.get_logger(__name__)

# After the drain's grace, how long handing back the jobs still running may take: interrupting a
# handler (its cleanup gets attempt.INTERRUPT_WAIT_S) and one write each.
HAND_BACK_TIMEOUT_S = 15.0


class Drain(Middleware):
    ending = Ending.HANDED_BACK

    def __init__(self, worker_id: str) -> None:
        self._worker_id = worker_id
        # From `begin` on, an attempt that does not return a result is handed back.
        self.draining = False

    def begin(self) -> None:
        self.draining = True

    def before_start(self, execution: Execution) -> None:
        if self.draining:  # claimed while the worker stops: it should not start at all
            execution.hand_back()

    def on_failure(self, execution: Execution, exc: BaseException) -> Change | None:
        if self.draining and execution.context.cancelled.is_set():
            # Most likely it stopped because the worker told it to: not the job's fault.
            return self.hand_back(execution)
        return None

    async def stop(self, execution: Execution, handler: HandlerTask) -> Change:
        log.warning("job.interrupted", job_id=execution.job_id, attempt=execution.attempt, reason="drain")
        await interrupt(handler)
        await execution.progress.flush()
        return self.hand_back(execution)

    def hand_back(self, execution: Execution) -> Change:
        log.info("job.handed_back", job_id=execution.job_id, attempt=execution.attempt)
        return changes.hand_back(execution.job, self._worker_id)


async def drain(executor: JobExecutor, jobs: set[asyncio.Task[None]], grace_s: float) -> None:
    """Tell the handlers, give `jobs` (the tasks running them) `grace_s` to finish, hand back the jobs
    still running, and stop waiting for the ones that cannot even be handed back."""
    log.info("worker.draining", in_flight=len(jobs), grace_s=grace_s)
    executor.drain()
    if jobs:
        await asyncio.wait(set(jobs), timeout=grace_s)
    if jobs:
        log.info("worker.handing_back", jobs=len(executor.running))
        executor.hand_back_all()
        await asyncio.wait(set(jobs), timeout=HAND_BACK_TIMEOUT_S)
    # Still not done: the database is out of reach. Those jobs' leases will run out, and the reaper
    # of another worker requeues them.
    for task in jobs:
        task.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
