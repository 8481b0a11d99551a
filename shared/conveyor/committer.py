"""Group commit: the changes of every concurrent caller of a process, written in one transaction.

A caller hands its changes to `apply` and waits; the committer writes whatever has gathered in one
transaction (`conveyor.changes.write_changes`) while the next callers gather behind it, so under load a
batch holds as many changes as arrived during the previous commit: one transaction and one fsync for
many jobs, and no caller waits for more than the commit in flight and its own. Each caller is answered
only once its batch has committed, and the batch's outbox rows are handed to the relay at that moment.

A batch that the database refuses as a whole for one bad item (a constraint, a value it cannot store)
is written again unit by unit, so only that item's caller sees the error. A database that is down fails
every caller of the batch with the error, and none of their changes was written.

The batch is written in the committer's own task, so the caller's trace context (`conveyor.tracing`)
is taken when it hands its changes over, and travels with its unit to the messages they stage.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

from conveyor import tracing
from conveyor.background import BackgroundTask
from conveyor.changes import Change, ChangeResult, Unit, WaitingCounts, Written, write_changes
from conveyor.database import Database
from conveyor.jobmetrics import observe_committed
from conveyor.outbox import OutboxRelay

log = structlog.get_logger(__name__)

# At most this many changes in one transaction; more wait for the next.
MAX_BATCH_CHANGES = 1000
# Errors that belong to what was written, not to the database being away: the batch is split.
ITEM_ERRORS = (IntegrityError, DataError, ProgrammingError)
# How long stopping may spend writing what has gathered (the database may be away).
STOP_TIMEOUT_S = 20.0


@dataclass(slots=True)
class _Waiting:
    unit: Unit
    answer: asyncio.Future[list[ChangeResult]]


class Committer:
    def __init__(
        self, db: Database, relay: OutboxRelay, prefix: str, *, max_batch: int = MAX_BATCH_CHANGES
    ) -> None:
        self._db = db
        self._relay = relay
        self._prefix = prefix
        self._max_batch = max_batch
        self._queue: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._loop = BackgroundTask("committer", self._run)
        self._stopping = False
        self._counts = WaitingCounts()
        self.batches = 0  # transactions written, for tests and benchmarks
        self.changes = 0

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Write what has gathered (for at most STOP_TIMEOUT_S), then stop."""
        if not self._loop.running:
            return
        self._stopping = True
        self._wake.set()
        if not await self._loop.stop(grace_s=STOP_TIMEOUT_S):
            # Cancelling leaves the queue as it was: these callers were never written.
            log.warning("committer.stop_timed_out", waiting=len(self._queue))
        _fail(self._queue, RuntimeError("the committer has stopped"))
        self._queue = []

    async def apply(
        self, changes: Sequence[Change], *, atomic: bool = False, trace: str | None = None
    ) -> list[ChangeResult]:
        """Write `changes` in the next batch; a result for each, once it has committed. Raises the
        database's error if the batch could not be written. Their messages carry `trace` (a carrier),
        by default the caller's current span's."""
        return await self.submit(changes, atomic=atomic, trace=trace)

    def submit(
        self, changes: Sequence[Change], *, atomic: bool = False, trace: str | None = None
    ) -> asyncio.Future[list[ChangeResult]]:
        """Like `apply`, for a caller that does not wait: the future resolves once it has committed."""
        if not self._loop.running or self._stopping:
            raise RuntimeError("the committer is not running")
        answer: asyncio.Future[list[ChangeResult]] = asyncio.get_running_loop().create_future()
        if not changes:
            answer.set_result([])
            return answer
        unit = Unit(tuple(changes), atomic, trace or tracing.current_carrier())
        self._queue.append(_Waiting(unit, answer))
        self._wake.set()
        return answer

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._write_next()
            if self._stopping:
                return

    async def _write_next(self) -> None:
        batch = self._take()
        try:
            written = await self._write([waiting.unit for waiting in batch])
        except ITEM_ERRORS as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            log.warning("committer.batch_split", units=len(batch), error=str(exc).splitlines()[0])
            for waiting in batch:
                await self._write_alone(waiting)
            return
        except Exception as exc:  # the database is away (or this process is stopping): no one is written
            _fail(batch, exc)
            return
        self._deliver(batch, written)

    async def _write_alone(self, waiting: _Waiting) -> None:
        try:
            written = await self._write([waiting.unit])
        except Exception as exc:
            _fail([waiting], exc)
            return
        self._deliver([waiting], written)

    def _take(self) -> list[_Waiting]:
        """The callers of the next batch: in arrival order, up to the batch limit (at least one)."""
        count = total = 0
        for waiting in self._queue:
            if count and total + len(waiting.unit.changes) > self._max_batch:
                break
            count += 1
            total += len(waiting.unit.changes)
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    async def _write(self, units: list[Unit]) -> Written:
        work = functools.partial(write_changes, units=units, prefix=self._prefix, counts=self._counts)
        written = await self._db.write(work)
        self.batches += 1
        self.changes += sum(len(unit.changes) for unit in units)
        return written

    def _deliver(self, batch: list[_Waiting], written: Written) -> None:
        # Committed: the relay publishes the rows now, and any relay would after a crash.
        self._relay.notify(written.outbox)
        observe_committed([waiting.unit for waiting in batch], written.results)
        for waiting, results in zip(batch, written.results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(results)


def _fail(batch: list[_Waiting], exc: BaseException) -> None:
    for waiting in batch:
        if not waiting.answer.done():
            waiting.answer.set_exception(exc)
            # A caller that stopped waiting (its request was cancelled) must not leave it unretrieved.
            waiting.answer.add_done_callback(_retrieved)


def _retrieved(future: asyncio.Future[list[ChangeResult]]) -> None:
    if not future.cancelled():
        future.exception()
