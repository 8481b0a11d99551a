"""One database read of a job for all the subscribers that ask for its snapshot at the same moment
(a reconnect storm, a page opened by many users), instead of one read each.

A subscriber watches its job first and asks for the snapshot second. A read admits joiners only until
it starts, so everyone it answers was watching before it read: an event newer than the snapshot
reaches each of them, as it would with a read of its own.
"""

from __future__ import annotations

import asyncio
import functools

from conveyor.database import Database
from conveyor.jobstore import get_job
from conveyor.models import JobRecord


class SnapshotReads:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Reads asked for and not started yet, per (tenant, job id).
        self._pending: dict[tuple[str, str], asyncio.Future[JobRecord | None]] = {}
        self._reads: set[asyncio.Task[None]] = set()

    async def job(self, tenant: str, job_id: str) -> JobRecord | None:
        key = (tenant, job_id)
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            read = asyncio.create_task(self._read(key, future))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)
        # Shielded: a subscriber that goes away does not cancel the read the others wait for.
        return await asyncio.shield(future)

    async def _read(self, key: tuple[str, str], future: asyncio.Future[JobRecord | None]) -> None:
        del self._pending[key]  # started: later subscribers get a read of their own
        tenant, job_id = key
        try:
            job = await self._db.read(functools.partial(get_job, tenant=tenant, job_id=job_id))
        except Exception as exc:  # every waiter raises it, as its own read would have
            future.set_exception(exc)
            future.exception()  # retrieved here too: no warning if every waiter went away
        else:
            future.set_result(job)
