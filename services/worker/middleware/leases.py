"""Leases and heartbeats: a running job belongs to its worker only while the worker is alive.

Each worker writes a heartbeat row about once a second (`jobstore.beat`), by the database's clock.
When a worker dies (`kill -9`, a lost machine), its heartbeat stops, and a few seconds later
(`CONVEYOR_WORKER_DEAD_AFTER_S`) any live worker's reaper gives its running jobs their next attempt.
Each job's lease, renewed three times per `CONVEYOR_LEASE_S`, stays the backstop: a job whose worker
keeps no heartbeat row is reaped when its lease runs out. Every comparison is made in the database by
its clock, and the reaper's update checks again that the attempt is still abandoned, so a worker's
clock, or a renewal committed while the reaper looked, cannot cost a live attempt. A worker that finds
it lost a lease stops the handler at once, and records nothing: another worker may be running the
job's next attempt already.

A worker that is alive but cannot write its heartbeat or renew (it lost the database, or its event
loop was starved) gives its attempts up itself, and stops their handlers, before any reaper can think
it dead: once three quarters of `CONVEYOR_WORKER_DEAD_AFTER_S` have passed since its last heartbeat,
or of a lease since its last renewal. So an attempt never runs on beside its successor: the same job
never runs twice at the same time.

The keeper runs four chores: the heartbeat, renewal, the reaper, and a fast round that first gives up
stale attempts (no database needed) and then looks for cancels (`cancellation.py`).
Its database round trips also tell whether the database is lost, which the worker loop asks
(`database_lost`) to leave the consumer group while it is. It changes no attempt itself: it asks the
executor (`renewed`, `lose`, `cancel`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection

from conveyor import changes
from conveyor.background import BackgroundTask, every
from conveyor.changes import Change
from conveyor.jobstore import (
    abandoned_jobs,
    beat,
    canceled_jobs,
    forget_dead_workers,
    forget_worker,
    lost_attempts,
    renew_leases,
)
from conveyor.topics import job_topic
from services.worker.attempt import Ending, Execution, HandlerTask, interrupt
from services.worker.context import WorkerContext
from services.worker.middleware import Middleware
from services.worker.middleware.cancellation import CANCEL_CHECK_INTERVAL_S, CancelWatch

if TYPE_CHECKING:
    from services.worker.execution import JobExecutor

log = structlog.get_logger(__name__)

# Renew three times per lease, so one slow database round trip does not cost a job.
RENEWALS_PER_LEASE = 3
# Heartbeats per CONVEYOR_WORKER_DEAD_AFTER_S (4 s by default: one a second), so that two slow ones in a
# row do not make a live worker look dead.
HEARTBEATS_PER_DEAD_AFTER = 4
# The reaper looks this often: with one heartbeat a second and 4 s to be dead, a killed worker's jobs
# start again about 4 to 5 s after the kill.
REAP_INTERVAL_S = 1.0
REAP_BATCH = 100
# Give an attempt up when this much of its lease, or of CONVEYOR_WORKER_DEAD_AFTER_S, has passed without
# a renewal or a heartbeat: a quarter of it is left before a reaper may act.
GIVE_UP_FRACTION = 0.75
# The heartbeat rows of workers dead this long are deleted (their jobs were reaped long before).
DEAD_WORKER_KEEP_S = 3600.0
PRUNE_INTERVAL_S = 60.0
# A worker that has not reached the database for this long (or a lease, if longer) leaves the consumer
# group until it is back: it could not claim the jobs of its partitions, so other workers should.
# Long enough that a slow spell of the database does not set off rebalances.
DATABASE_LOST_MIN_S = 10.0
# Every chore's failed round is logged as this, and the next round comes at the usual interval.
TASK_FAILED = "lease.task_failed"


def _key_partition(topic: str, job_id: str) -> int | None:
    return None


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
        self._dead_after_s = context.settings.worker_dead_after_s
        self._chores: list[BackgroundTask] = [
            every(
                self._dead_after_s / HEARTBEATS_PER_DEAD_AFTER,
                self.beat,
                name="heartbeat",
                failure_event=TASK_FAILED,
            ),
            every(
                self._lease_s / RENEWALS_PER_LEASE, self.renew, name="lease-renew", failure_event=TASK_FAILED
            ),
            every(REAP_INTERVAL_S, self.reap, name="lease-reap", failure_event=TASK_FAILED),
            every(
                PRUNE_INTERVAL_S, self.forget_dead_workers, name="heartbeat-prune", failure_event=TASK_FAILED
            ),
            every(CANCEL_CHECK_INTERVAL_S, self.watch, name="cancel-check", failure_event=TASK_FAILED),
        ]
        # Where a job taken over from a dead worker is sent: a partition this worker consumes (the feed
        # sets it once it has started), so the job need not wait for the dead worker's partitions.
        self.partition_for: Callable[[str, str], int | None] = _key_partition
        # When a round trip to the database last succeeded, and when the last heartbeat that was written
        # was asked for (the event loop's clock).
        self._database_seen_at = 0.0
        self._beat_at: float | None = None  # None: no heartbeat row yet, so reapers go by the leases

    @property
    def database_lost(self) -> bool:
        """Whether the database has not answered for long enough that this worker should step aside."""
        silent_s = asyncio.get_running_loop().time() - self._database_seen_at
        return silent_s > max(self._lease_s, DATABASE_LOST_MIN_S)

    def _database_answered(self) -> None:
        self._database_seen_at = asyncio.get_running_loop().time()

    async def start(self) -> None:
        """The first heartbeat, before the worker claims anything; then the chores."""
        await self.beat()
        for chore in self._chores:
            chore.start()

    async def stop(self) -> None:
        await asyncio.gather(*(chore.stop() for chore in self._chores))
        try:
            await self._context.db.write(functools.partial(forget_worker, worker_id=self._context.worker_id))
        except Exception:
            # Harmless: the row just looks dead soon, and what this worker held was handed back.
            log.warning("heartbeat.forget_failed", worker_id=self._context.worker_id, exc_info=True)

    async def beat(self) -> None:
        asked_at = asyncio.get_running_loop().time()
        await self._context.db.write(functools.partial(beat, worker_id=self._context.worker_id))
        self._database_answered()
        self._beat_at = asked_at

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
        """Stop the attempts whose lease this worker has not renewed for most of its length, and every
        attempt if its heartbeat has been missing for most of the time after which it counts as dead."""
        now = asyncio.get_running_loop().time()
        heartbeat_silent_s = 0.0 if self._beat_at is None else now - self._beat_at
        heartbeat_stale = heartbeat_silent_s > self._dead_after_s * GIVE_UP_FRACTION
        for execution in list(self._executor.running.values()):
            if execution.lost.is_set():
                continue
            silent_s = now - execution.renewed_at
            if heartbeat_stale:
                reason, silent_s = "heartbeat", heartbeat_silent_s
            elif silent_s > self._lease_s * GIVE_UP_FRACTION:
                reason = "lease"
            else:
                continue
            log.warning(
                "lease.given_up",
                job_id=execution.job_id,
                attempt=execution.attempt,
                reason=reason,
                silent_s=round(silent_s, 3),
            )
            self._executor.lose(execution.job_id, execution.attempt)

    async def forget_dead_workers(self) -> None:
        await self._context.db.write(functools.partial(forget_dead_workers, older_than_s=DEAD_WORKER_KEEP_S))

    async def reap(self) -> None:
        """Give each job whose worker is dead its next attempt (or fail it if attempts are spent)."""
        dead_after_s = self._dead_after_s
        expired = await self._context.db.read(
            functools.partial(abandoned_jobs, limit=REAP_BATCH, dead_after_s=dead_after_s)
        )
        self._database_answered()
        if not expired:
            return
        prefix = self._context.settings.topic_prefix
        results = await self._context.committer.apply(
            [
                changes.expire_lease(
                    job, dead_after_s, self.partition_for(job_topic(prefix, job.priority), job.id)
                )
                for job in expired
            ]
        )
        for job, result in zip(expired, results, strict=True):
            if result.written:
                log.warning("lease.expired", job_id=job.id, attempt=job.attempts, worker=job.worker_id)
