"""Leases: a running job belongs to its worker only while the worker's heartbeat renews the lease.

When a worker dies (`kill -9`, a lost machine), its leases run out and any live worker's reaper
gives the jobs their next attempt. A worker that finds it lost a lease stops the handler at once, and
records nothing: another worker may be running the job's next attempt already.

A worker that is alive but cannot renew (it lost the database, or its event loop was starved) gives
its leases up itself once three quarters of their length have passed since the last renewal, and stops
their handlers, before any reaper can see the lease expire. So an attempt never runs on beside its
successor: the same job never runs twice at the same time.

The keeper runs three chores: renewal, the reaper, and a fast round that first gives up stale leases
(no database needed) and then looks for cancels (`cancellation.py`), so both keep the pace they had.
Its database round trips also tell whether the database is lost, which the worker loop asks
(`database_lost`) to leave the consumer group while it is. It changes no attempt itself: it asks the
executor (`renewed`, `lose`, `cancel`).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection

from conveyor import changes
from conveyor.background import BackgroundTask, every
from conveyor.changes import Change
from conveyor.jobstore import canceled_jobs, expired_leases, lost_attempts, renew_leases
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.context import WorkerContext
from services.worker.middleware import Middleware
from services.worker.middleware.cancellation import CANCEL_CHECK_INTERVAL_S, CancelWatch

if TYPE_CHECKING:
    from services.worker.execution import JobExecutor

log = structlog.get_logger(__name__)

# Renew three times per lease, so one slow database round trip does not cost a job.
RENEWALS_PER_LEASE = 3
REAP_INTERVAL_S = 2.0
REAP_BATCH = 100
# Give a lease up when this much of it has passed without a renewal: renewals come every third of it,
# so this is two missed renewals and then some, and a quarter of the lease is left before a reaper acts.
GIVE_UP_FRACTION = 0.75
# A worker that has not reached the database for this long (or a lease, if longer) leaves the consumer
# group until it is back: it could not claim the jobs of its partitions, so other workers should.
# Long enough that a slow spell of the database does not set off rebalances.
DATABASE_LOST_MIN_S = 10.0
# Every chore's failed round is logged as this, and the next round comes at the usual interval.
TASK_FAILED = "lease.task_failed"


class LostLease(Middleware):
    """The attempt's lease is gone: interrupt the handler at once, record nothing."""

    ending = Ending.LOST

    async def stop(self, execution: Execution, handler: HandlerTask) -> Change | None:
        log.warning("job.abandoned", job_id=execution.job_id, attempt=execution.attempt, reason="lease lost")
        await interrupt(handler)
        return None


class LeaseKeeper:
    def __init__(self, context: WorkerContext, executor: JobExecutor, cancels: CancelWatch) -> None:
        self._context = context
        self._executor = executor
        self._cancels = cancels
        self._lease_s = context.settings.lease_s
        self._chores: list[BackgroundTask] = [
            every(
                self._lease_s / RENEWALS_PER_LEASE, self.renew, name="lease-renew", failure_event=TASK_FAILED
            ),
            every(REAP_INTERVAL_S, self.reap, name="lease-reap", failure_event=TASK_FAILED),
            every(CANCEL_CHECK_INTERVAL_S, self.watch, name="cancel-check", failure_event=TASK_FAILED),
        ]
        # When a round trip to the database last succeeded (the event loop's clock).
        self._database_seen_at = 0.0

    @property
    def database_lost(self) -> bool:
        """Whether the database has not answered for long enough that this worker should step aside."""
        silent_s = asyncio.get_running_loop().time() - self._database_seen_at
        return silent_s > max(self._lease_s, DATABASE_LOST_MIN_S)

    def _database_answered(self) -> None:
        self._database_seen_at = asyncio.get_running_loop().time()

    def start(self) -> None:
        self._database_answered()  # the worker has just migrated it
        for chore in self._chores:
            chore.start()

    async def stop(self) -> None:
        await asyncio.gather(*(chore.stop() for chore in self._chores))

    async def renew(self) -> None:
        running = self._executor.attempts
        if not running:
            return
        asked_at = asyncio.get_running_loop().time()
        worker_id = self._context.worker_id
        lease_s = self._lease_s

        def renew(connection: Connection) -> tuple[set[str], dict[str, int], set[str], set[str]]:
            held = renew_leases(connection, worker_id, running, lease_s)
            missed = {job_id: running[job_id] for job_id in running.keys() - held}
            lost = lost_attempts(connection, worker_id, missed)
            # A cancel also ends the lease; that one gets the handler's grace period, not "lease lost".
            return held, missed, lost, canceled_jobs(connection, lost)

        held, missed, lost, canceled = await self._context.db.write(renew)
        self._database_answered()
        for job_id in held:
            # The lease runs from the moment the renewal was asked for, at the latest.
            self._executor.renewed(job_id, running[job_id], asked_at)
        for job_id in lost:
            if not self._executor.holds(job_id, missed[job_id]):
                continue
            if job_id in canceled:
                self._cancels.seen([job_id])
            else:
                log.warning("lease.lost", job_id=job_id, attempt=missed[job_id])
                self._executor.lose(job_id, missed[job_id])

    async def watch(self) -> None:
        """The fast round: give up stale leases, with no database needed, then look for cancels."""
        self.give_up_stale_leases()
        await self._cancels.check()

    def give_up_stale_leases(self) -> None:
        """Stop the attempts whose lease this worker has not renewed for most of its length."""
        now = asyncio.get_running_loop().time()
        for execution in list(self._executor.running.values()):
            silent_s = now - execution.renewed_at
            if silent_s > self._lease_s * GIVE_UP_FRACTION and not execution.lost.is_set():
                log.warning(
                    "lease.given_up",
                    job_id=execution.job_id,
                    attempt=execution.attempt,
                    silent_s=round(silent_s, 3),
                )
                self._executor.lose(execution.job_id, execution.attempt)

    async def reap(self) -> None:
        """Give each job whose lease ran out its next attempt (or fail it if attempts are spent)."""
        expired = await self._context.db.read(functools.partial(expired_leases, limit=REAP_BATCH))
        # The reaper asks every REAP_INTERVAL_S, with jobs running or not: the database's heartbeat.
        self._database_answered()
        if not expired:
            return
        results = await self._context.committer.apply([changes.expire_lease(job) for job in expired])
        for job, result in zip(expired, results, strict=True):
            if result.written:
                log.warning("lease.expired", job_id=job.id, attempt=job.attempts, worker=job.worker_id)
