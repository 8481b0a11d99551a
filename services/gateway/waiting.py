"""`GET /v1/jobs/<id>?wait=N`: holding a status request until the job's status changes, without polling
the database once per waiting request.

Every change of a job is published as an event on the events topic, keyed by job id (the progress
service reads the same topic). While any request waits, the gateway reads that topic too, from its
end, and looks at each event's key alone: a dict lookup, the value parsed only for a watched job.
The requests waiting on one job share one `JobWatch`, which reads the job from the database once when
it starts, once per event whose status differs from the one waited on, and once every
WAIT_FALLBACK_S in case an event was missed (Kafka down, a reader starting): a few reads per job,
however many requests wait on it. With nothing waiting for NOTIFIER_IDLE_S the reader stops, so a
gateway nobody long-polls reads no events at all.

Each gateway also caps the requests waiting at once per tenant (`CONVEYOR_TENANT_MAX_WAITING`): past
it a `?wait=` is answered 429, as each holds a connection and a slot for up to a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from sqlalchemy.exc import SQLAlchemyError

from conveyor.broker import BrokerUnavailable, start_events_consumer, stop_consumer
from conveyor.database import Database
from conveyor.jobstore import get_job
from conveyor.jsoncodec import loads
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord
from conveyor.problems import Problem, too_many_requests

log = structlog.get_logger(__name__)

# A watched job is read again this often even without an event, so a missed event delays an answer
# by this much at most rather than holding it until its wait runs out.
WAIT_FALLBACK_S = 5.0
# How long a new watch waits for the events reader to be in place before it reads the job anyway.
NOTIFIER_READY_TIMEOUT_S = 5.0
# With nothing watched for this long, the events reader stops (and starts again with the next watch).
NOTIFIER_IDLE_S = 30.0
# After the reader failed to start (Kafka down), watches rely on their fallback reads this long
# before the next watch tries again.
NOTIFIER_RETRY_S = 5.0
POLL_TIMEOUT_MS = 200
# What a tenant over its cap of waiting requests is told to wait: a waiting slot frees within a minute.
WAITING_RETRY_AFTER_S = 5

Ready = asyncio.Future[bool]


class StateNotifier:
    """Reads the events topic while jobs are watched, and pokes the watches of each event's job whose
    status is not the one they wait on."""

    def __init__(self, bootstrap: str, prefix: str, idle_s: float = NOTIFIER_IDLE_S) -> None:
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._idle_s = idle_s
        self._watches: dict[str, set[JobWatch]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready: Ready | None = None
        self._failed_at = -NOTIFIER_RETRY_S

    def watch(self, watch: JobWatch) -> Ready:
        """Poke `watch` from now on; the answer says once the reader is in place (False: it is not)."""
        self._watches.setdefault(watch.job_id, set()).add(watch)
        return self._reading()

    def unwatch(self, watch: JobWatch) -> None:
        watches = self._watches.get(watch.job_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.job_id]

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _reading(self) -> Ready:
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._ready is not None:
            return self._ready
        ready: Ready = loop.create_future()
        if loop.time() - self._failed_at < NOTIFIER_RETRY_S:
            ready.set_result(False)
            return ready
        self._ready = ready
        self._reader = asyncio.create_task(self._read(ready), name="gateway-state-notifier")
        return ready

    async def _read(self, ready: Ready) -> None:
        loop = asyncio.get_running_loop()
        try:
            consumer = await start_events_consumer(self._bootstrap, self._prefix)
        except (KafkaError, BrokerUnavailable, OSError) as exc:
            log.warning("waiting.notifier_unavailable", error=str(exc))
            self._failed_at = loop.time()
            self._forget(ready)
            ready.set_result(False)
            return
        ready.set_result(True)
        try:
            await self._dispatch_until_idle(consumer)
        finally:
            self._forget(ready)
            await stop_consumer(consumer)

    async def _dispatch_until_idle(self, consumer: AIOKafkaConsumer) -> None:
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("waiting.fetch_failed", error=str(exc))
                return  # the watches' fallback reads cover the gap; the next watch starts a reader
            for records in batches.values():
                for record in records:
                    self.dispatch(record.key, record.value)
            if self._watches:
                idle_since = None
            elif idle_since is None:
                idle_since = loop.time()
            elif loop.time() - idle_since > self._idle_s:
                return

    def _forget(self, ready: Ready) -> None:
        """The reader of `ready` is ending: the next watch starts another (this one may still be stopping)."""
        if self._ready is ready:
            self._reader = self._ready = None

    def dispatch(self, key: bytes | None, value: bytes | None) -> None:
        watches = self._watches.get(key.decode()) if key else None
        if not watches or value is None:
            return  # the common case: nobody waits on this job, so its event is not even parsed
        try:
            status = loads(value).get("status")
        except (ValueError, AttributeError):
            return
        for watch in watches:
            if status != watch.status:
                watch.poke()


class JobWatch:
    """The requests waiting for one job of one tenant to leave `status`: one reader of the database for
    all of them. `changed` resolves with the job once its status differs (or None if it is gone)."""

    def __init__(self, db: Database, tenant: str, job_id: str, status: JobState) -> None:
        self.tenant = tenant
        self.job_id = job_id
        self.status = status
        self.waiters = 0
        self.changed: asyncio.Future[JobRecord | None] = asyncio.get_running_loop().create_future()
        self._db = db
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, ready: Ready) -> None:
        self._task = asyncio.create_task(self._follow(ready), name=f"wait-{self.job_id}")

    def poke(self) -> None:
        self._poked.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self, ready: Ready) -> None:
        # Once the reader is in place, every change is seen as an event; one read then covers the
        # changes before it (since the waiting request read the job).
        await asyncio.wait({ready}, timeout=NOTIFIER_READY_TIMEOUT_S)
        while True:
            self._poked.clear()
            job = await self._read()
            if job is None or job.status != self.status:
                self.changed.set_result(job)
                return
            # An event pokes the watch; without one it reads again after WAIT_FALLBACK_S anyway, in
            # case an event was missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), WAIT_FALLBACK_S)

    async def _read(self) -> JobRecord | None:
        while True:
            try:
                return await self._db.read(functools.partial(get_job, tenant=self.tenant, job_id=self.job_id))
            except (SQLAlchemyError, OSError) as exc:  # the database is down: the watch tries again
                log.warning("waiting.read_failed", job_id=self.job_id, error=str(exc))
                await asyncio.sleep(WAIT_FALLBACK_S)


@dataclass
class Waits:
    """Every request waiting on a job in this gateway: their watches and each tenant's count."""

    db: Database
    notifier: StateNotifier

    def __post_init__(self) -> None:
        self._watches: dict[tuple[str, str, JobState], JobWatch] = {}
        self._per_tenant: dict[str, int] = {}

    async def until_changed(
        self,
        job: JobRecord,
        tenant: str,
        wait_s: float,
        max_waiting: int,
        disconnected: Callable[[], Awaitable[None]],
    ) -> JobRecord:
        """The job once its status differs from `job`'s; as it is when `wait_s` runs out or the client
        goes. A 429 if the tenant already has `max_waiting` requests waiting in this gateway."""
        waiting = self._per_tenant.get(tenant, 0)
        if waiting >= max_waiting:
            raise over_waiting_cap(waiting)
        self._per_tenant[tenant] = waiting + 1
        watch = self._watch(job, tenant)
        gone: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {watch.changed, gone}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
            if watch.changed in done:
                return watch.changed.result() or job
            return job
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            self._per_tenant[tenant] -= 1
            if not self._per_tenant[tenant]:
                del self._per_tenant[tenant]
            await self._leave(watch)

    def _watch(self, job: JobRecord, tenant: str) -> JobWatch:
        key = (tenant, job.id, job.status)
        watch = self._watches.get(key)
        if watch is None or watch.changed.done():
            watch = self._watches[key] = JobWatch(self.db, tenant, job.id, job.status)
            watch.start(self.notifier.watch(watch))
        watch.waiters += 1
        return watch

    async def _leave(self, watch: JobWatch) -> None:
        watch.waiters -= 1
        if watch.waiters:
            return
        key = (watch.tenant, watch.job_id, watch.status)
        if self._watches.get(key) is watch:
            del self._watches[key]
        self.notifier.unwatch(watch)
        await watch.close()

    async def stop(self) -> None:
        for watch in list(self._watches.values()):
            self.notifier.unwatch(watch)
            await watch.close()
        self._watches.clear()
        await self.notifier.stop()


def over_waiting_cap(waiting: int) -> Problem:
    return too_many_requests(
        f"{waiting} requests of this tenant are already waiting (`?wait=`) on this gateway",
        WAITING_RETRY_AFTER_S,
        "max_waiting",
    )
