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

from conveyor import changes, committer, outbox, processes
from conveyor.broker import CONSUMER_STOP_TIMEOUT_S
from conveyor.changes import Change
from conveyor.database import SQLITE_BUSY_TIMEOUT_MS
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.feed import COMMIT_TIMEOUT_S
from services.worker.middleware import Middleware

if TYPE_CHECKING:
    from services.worker.execution import JobExecutor

log = structlog.get_logger(__name__)

# After the drain's grace, how long handing back the jobs still running may take: interrupting a
# handler (its cleanup gets attempt.INTERRUPT_WAIT_S) and one write each.
HAND_BACK_TIMEOUT_S = 15.0
# What stopping does after the drain, one step after another, each bounded: commit the offsets, leave
# the consumer group, write what the committer holds, publish what the relay holds and close its
# producer, stop the process pool (and kill what ignores it). Forgetting the heartbeat is one write.
SHUTDOWN_STEPS_S = (
    COMMIT_TIMEOUT_S,
    CONSUMER_STOP_TIMEOUT_S,
    committer.STOP_TIMEOUT_S,
    outbox.STOP_TIMEOUT_S * 2,
    processes.SHUTDOWN_WAIT_S + processes.KILL_WAIT_S,
    SQLITE_BUSY_TIMEOUT_MS / 1000,
)


def worst_case_shutdown_s(drain_grace_s: float) -> float:
    """The longest a worker takes from SIGTERM to exit, every step at its bound (a slow database and a
    slow Kafka at once): a pod's termination grace must be at least this, or the worker is killed
    before it has handed its jobs back and they wait for the reaper instead."""
    return drain_grace_s + HAND_BACK_TIMEOUT_S + sum(SHUTDOWN_STEPS_S)


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
