"""What a subscription starts from, read in batches: a job's snapshot, or a resume's replay (the job
and its events after `after_seq`). Every subscriber that asks while a read is under way waits for
the next read, and that one read answers them all in one transaction: one query for all their jobs,
and one for each distinct (job, `after_seq`) to replay. After a reconnect storm, the subscribers of
one job mostly resume from the same seq, so it is a few reads a second instead of one per subscriber.

A subscriber watches its job first and asks second. A batch admits askers only until its read starts,
so everyone it answers was watching before it read: an event newer than what it read reaches each of
them, as it would with a read of its own.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection

from conveyor.database import Database
from conveyor.eventlog import events_between
from conveyor.events import JobEvent
from conveyor.jobstore import tenants_jobs
from conveyor.models import JobRecord

JobKey = tuple[str, str]  # (tenant, job id)
ResumeKey = tuple[str, str, int]  # (tenant, job id, after_seq)
# The job (None if the tenant has no such job) and its events after `after_seq` (None if `after_seq` is
# not below the job's last seq, or some of those events were pruned).
Replay = tuple[JobRecord | None, list[JobEvent] | None]
K = TypeVar("K", JobKey, ResumeKey)
T = TypeVar("T")

# The least time from one read's start to the next's: a subscriber waits at most this long more for
# its snapshot, against a read of ~0.2 ms of CPU per subscriber in a flood without it.
READ_INTERVAL_S = 0.01


@dataclass
class _Batch:
    jobs: dict[JobKey, asyncio.Future[JobRecord | None]] = field(default_factory=dict)
    resumes: dict[ResumeKey, asyncio.Future[Replay]] = field(default_factory=dict)

    def futures(self) -> list[asyncio.Future[Any]]:
        return [*self.jobs.values(), *self.resumes.values()]

    def __bool__(self) -> bool:
        return bool(self.jobs or self.resumes)


class SnapshotReads:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Asked for and not read yet: the next batch.
        self._pending = _Batch()
        # Reads the batches one after the other while there are any; None when there are none.
        self._reader: asyncio.Task[None] | None = None
        # The loop's time when the last read started.
        self._read_at = -READ_INTERVAL_S

    async def job(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job as it is now (None if it has no such job), read after this call began."""
        return await self._ask(self._pending.jobs, (tenant, job_id))

    async def resume(self, tenant: str, job_id: str, after_seq: int) -> Replay:
        """The tenant's job as it is now, and its events after `after_seq` up to its last seq."""
        return await self._ask(self._pending.resumes, (tenant, job_id, after_seq))

    async def _ask(self, asked: dict[K, asyncio.Future[T]], key: K) -> T:
        """Join the next batch's askers of `key` (in `asked`, one of its two kinds of read)."""
        future = asked.get(key)
        if future is None:
            future = asked[key] = asyncio.get_running_loop().create_future()
            if self._reader is None:
                self._reader = asyncio.create_task(self._read_batches())
        # Shielded: a subscriber that goes away does not cancel the read the others wait for.
        return await asyncio.shield(future)

    async def _read_batches(self) -> None:
        batch = _Batch()
        try:
            loop = asyncio.get_running_loop()
            while self._pending:
                pause = self._read_at + READ_INTERVAL_S - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)  # askers meanwhile join this batch
                self._read_at = loop.time()
                batch, self._pending = self._pending, _Batch()  # started: later askers wait for the next
                read = functools.partial(_read, jobs=list(batch.jobs), resumes=list(batch.resumes))
                try:
                    found, replays = await self._db.read(read)
                except Exception as exc:  # every asker raises it, as its own read would have
                    for failed in batch.futures():
                        failed.set_exception(exc)
                        failed.exception()  # retrieved here too: no warning if every asker went away
                else:
                    for key, job in batch.jobs.items():
                        job.set_result(found.get(key))
                    for resume_key, replay in batch.resumes.items():
                        replay.set_result(replays[resume_key])
                batch = _Batch()
        finally:
            self._reader = None
            for future in (*batch.futures(), *self._pending.futures()):
                future.cancel()  # the service is stopping: nobody waits for these any more
            self._pending = _Batch()


def _read(
    connection: Connection, jobs: list[JobKey], resumes: list[ResumeKey]
) -> tuple[dict[JobKey, JobRecord], dict[ResumeKey, Replay]]:
    found = tenants_jobs(connection, {*jobs, *((tenant, job_id) for tenant, job_id, _ in resumes)})
    replays: dict[ResumeKey, Replay] = {}
    for tenant, job_id, after_seq in resumes:
        job = found.get((tenant, job_id))
        events = None
        if job is not None and 0 <= after_seq < job.last_seq:
            events = events_between(connection, job_id, after_seq, job.last_seq, tenant=tenant)
        replays[(tenant, job_id, after_seq)] = (job, events)
    return found, replays
