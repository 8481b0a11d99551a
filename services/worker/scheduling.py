"""The scheduler: every worker queues the scheduled jobs whose `run_at` has come.

A scheduled job is only a row in the database, not a Kafka message yet. Twice a second each worker
looks for due jobs and moves them `scheduled -> queued`, staging their state event and job message in
the same transaction, like the gateway does for a job submitted to run at once. Workers race for the
same jobs on purpose (there is no leader to lose): the conditional transition lets only one of them
queue each job, and the others' updates match no row.
"""

from __future__ import annotations

import functools

import structlog

from conveyor import changes
from conveyor.background import every
from conveyor.jobstore import due_jobs
from services.worker.context import WorkerContext

log = structlog.get_logger(__name__)

# Half a second between looks, so a job starts within about a second of its `run_at`.
SCHEDULE_INTERVAL_S = 0.5
# Due jobs queued per transaction; a full batch means a backlog, so the next batch follows at once.
SCHEDULE_BATCH = 100


class Scheduler:
    def __init__(
        self, context: WorkerContext, *, interval_s: float = SCHEDULE_INTERVAL_S, batch: int = SCHEDULE_BATCH
    ) -> None:
        self._db = context.db
        self._committer = context.committer
        self._batch = batch
        self._chore = every(interval_s, self.queue_all_due, name="scheduler", failure_event="schedule.failed")

    def start(self) -> None:
        self._chore.start()

    async def stop(self) -> None:
        await self._chore.stop()

    async def queue_all_due(self) -> None:
        """Queue due jobs a batch at a time; a full batch means a backlog, so the next follows at once."""
        while await self.queue_due() >= self._batch:
            pass

    async def queue_due(self) -> int:
        """Queue the jobs that are due now; returns how many this worker queued."""
        # Look with a read first: on SQLite a write transaction takes the database's write lock, and most
        # looks find nothing to do.
        due = await self._db.read(functools.partial(due_jobs, limit=self._batch))
        if not due:
            return 0
        # In one transaction. Every worker locks the rows in the same order (by id), so two racing
        # workers cannot deadlock.
        due.sort(key=lambda job: job.id)
        results = await self._committer.apply([changes.queue_due(job.id) for job in due])
        queued = 0
        for job, result in zip(due, results, strict=True):
            if not result.written:
                continue  # another worker queued it first, or it was canceled meanwhile
            queued += 1
            log.info("job.due", job_id=job.id, run_at=job.run_at.isoformat() if job.run_at else None)
        return queued
