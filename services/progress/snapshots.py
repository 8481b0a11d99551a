"""Snapshot reads in batches: every subscriber that asks for a job's snapshot while a read is under
way waits for the next read, and that one read fetches all their jobs in one query (a reconnect
storm, a page opened by many users: a few reads a second instead of one per subscriber).

A subscriber watches its job first and asks for the snapshot second. A batch admits askers only until
its read starts, so everyone it answers was watching before it read: an event newer than the snapshot
reaches each of them, as it would with a read of its own.
"""

from __future__ import annotations

import asyncio
import functools

from conveyor.database import Database
from conveyor.jobstore import tenants_jobs
from conveyor.models import JobRecord

Key = tuple[str, str]  # (tenant, job id)


class SnapshotReads:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Asked for and not read yet: the next batch.
        self._pending: dict[Key, asyncio.Future[JobRecord | None]] = {}
        # Reads the batches one after the other while there are any; None when there are none.
        self._reader: asyncio.Task[None] | None = None

    async def job(self, tenant: str, job_id: str) -> JobRecord | None:
        """The tenant's job as it is now (None if it has no such job), read after this call began."""
        key = (tenant, job_id)
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            if self._reader is None:
                self._reader = asyncio.create_task(self._read_batches())
        # Shielded: a subscriber that goes away does not cancel the read the others wait for.
        return await asyncio.shield(future)

    async def _read_batches(self) -> None:
        batch: dict[Key, asyncio.Future[JobRecord | None]] = {}
        try:
            while self._pending:
                batch, self._pending = self._pending, {}  # started: later askers wait for the next one
                try:
                    jobs = await self._db.read(functools.partial(tenants_jobs, keys=list(batch)))
                except Exception as exc:  # every asker raises it, as its own read would have
                    for future in batch.values():
                        future.set_exception(exc)
                        future.exception()  # retrieved here too: no warning if every asker went away
                else:
                    for key, future in batch.items():
                        future.set_result(jobs.get(key))
                batch = {}
        finally:
            self._reader = None
            for future in (*batch.values(), *self._pending.values()):
                future.cancel()  # the service is stopping: nobody waits for these any more
            self._pending = {}
