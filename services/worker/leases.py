"""Leases: a running job belongs to its worker only while the worker's heartbeat renews the lease.

When a worker dies (`kill -9`, a lost machine), its leases run out and any live worker's reaper
gives the jobs their next attempt. A worker that finds it lost a lease stops the handler at once.

A worker that is alive but cannot renew (it lost the database, or its event loop was starved) gives
its leases up itself once three quarters of their length have passed since the last renewal, and stops
their handlers, before any reaper can see the lease expire. So an attempt never runs on beside its
successor: the same job never runs twice at the same time.

The keeper also watches the worker's running jobs for cancels, more often than it renews leases, so
a canceled job's handler hears of it within a second (see `execution.py` for what happens next).
"""

from __future__ import annotations

import asyncio
import functools

import structlog
from sqlalchemy import Connection

from conveyor import changes
from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.jobstore import canceled_jobs, expired_leases, lost_attempts, renew_leases
from services.worker.execution import JobExecutor
from services.worker.periodic import run_every

log = structlog.get_logger(__name__)

# Renew three times per lease, so one slow database round trip does not cost a job.
RENEWALS_PER_LEASE = 3
REAP_INTERVAL_S = 2.0
REAP_BATCH = 100
# A cancel reaches the handler within about this long: one cheap read of the running jobs' ids.
CANCEL_CHECK_INTERVAL_S = 0.5
# Give a lease up when this much of it has passed without a renewal: renewals come every third of it,
# so this is two missed renewals and then some, and a quarter of the lease is left before a reaper acts.
GIVE_UP_FRACTION = 0.75
# A worker that has not reached the database for this long (or a lease, if longer) leaves the consumer
# group until it is back: it could not claim the jobs of its partitions, so other workers should.
# Long enough that a slow spell of the database does not set off rebalances.
DATABASE_LOST_MIN_S = 10.0


class LeaseKeeper:
    def __init__(self, *, db: Database, committer: Committer, executor: JobExecutor, lease_s: float):
        self._db = db
        self._committer = committer
        self._executor = executor
        self._lease_s = lease_s
        self._tasks: list[asyncio.Task[None]] = []
        # When a round trip to the database last succeeded (the event loop's clock).
        self._database_seen_at = 0.0

    @property
    def database_lost(self) -> bool:
        """Whether the database has not answered for long enough that this worker should step aside."""
        silent_s = asyncio.get_running_loop().time() - self._database_seen_at
        return silent_s > max(self._lease_s, DATABASE_LOST_MIN_S)

    def _database_answered(self) -> None:
        self._database_seen_at = asyncio.get_running_loop().time()

    async def start(self) -> None:
        self._database_answered()  # the worker has just migrated it
        self._tasks = [
            asyncio.create_task(
                run_every(self._lease_s / RENEWALS_PER_LEASE, self.renew, "lease.task_failed"),
                name="lease-renew",
            ),
            asyncio.create_task(
                run_every(REAP_INTERVAL_S, self.reap, "lease.task_failed"), name="lease-reap"
            ),
            asyncio.create_task(
                run_every(CANCEL_CHECK_INTERVAL_S, self.check_cancels, "lease.task_failed"),
                name="cancel-check",
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def renew(self) -> None:
        running = {job_id: execution.attempt for job_id, execution in self._executor.running.items()}
        if not running:
            return
        asked_at = asyncio.get_running_loop().time()
        worker_id = self._executor.worker_id

        def renew(connection: Connection) -> tuple[set[str], dict[str, int], set[str], set[str]]:
            held = renew_leases(connection, worker_id, running, self._lease_s)
            missed = {job_id: running[job_id] for job_id in running.keys() - held}
            lost = lost_attempts(connection, worker_id, missed)
            # A cancel also ends the lease; that one gets the handler's grace period, not "lease lost".
            return held, missed, lost, canceled_jobs(connection, lost)

        held, missed, lost, canceled = await self._db.write(renew)
        if running:
            self._database_answered()
        for job_id in held:
            execution = self._executor.running.get(job_id)
            if execution is not None and execution.attempt == running[job_id]:
                # The lease runs from the moment the renewal was asked for, at the latest.
                execution.renewed_at = max(execution.renewed_at, asked_at)
        for job_id in lost:
            execution = self._executor.running.get(job_id)
            if execution is None or execution.attempt != missed[job_id]:
                continue
            if job_id in canceled:
                self._cancel(job_id)
            else:
                log.warning("lease.lost", job_id=job_id, attempt=execution.attempt)
                execution.lose()

    def give_up_stale_leases(self) -> None:
        """Stop the attempts whose lease this worker has not renewed for most of its length."""
        now = asyncio.get_running_loop().time()
        for execution in self._executor.running.values():
            silent_s = now - execution.renewed_at
            if silent_s > self._lease_s * GIVE_UP_FRACTION and not execution.lost.is_set():
                log.warning(
                    "lease.given_up",
                    job_id=execution.job_id,
                    attempt=execution.attempt,
                    silent_s=round(silent_s, 3),
                )
                execution.lose()

    async def check_cancels(self) -> None:
        """Tell the handlers of this worker's jobs that were canceled since the last look. First, with no
        database needed, give up the leases that have gone unrenewed too long."""
        self.give_up_stale_leases()
        running = list(self._executor.running)
        if not running:
            return
        canceled = await self._db.read(functools.partial(canceled_jobs, job_ids=running))
        for job_id in canceled:
            self._cancel(job_id)

    def _cancel(self, job_id: str) -> None:
        execution = self._executor.running.get(job_id)
        if execution is None or execution.canceled.is_set():
            return
        log.info("job.cancel_seen", job_id=job_id, attempt=execution.attempt)
        execution.cancel()

    async def reap(self) -> None:
        """Give each job whose lease ran out its next attempt (or fail it if attempts are spent)."""
        expired = await self._db.read(functools.partial(expired_leases, limit=REAP_BATCH))
        # The reaper asks every REAP_INTERVAL_S, with jobs running or not: the database's heartbeat.
        self._database_answered()
        if not expired:
            return
        results = await self._committer.apply([changes.expire_lease(job) for job in expired])
        for job, result in zip(expired, results, strict=True):
            if result.written:
                log.warning("lease.expired", job_id=job.id, attempt=job.attempts, worker=job.worker_id)
