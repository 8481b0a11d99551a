"""The transactional outbox: Kafka messages are written in the same transaction as the state they announce,
then published by a relay. A process that dies between its commit and its publish loses nothing: the
relay of any live process sweeps rows that have waited longer than `ORPHAN_AGE_S` and publishes them.

Publishing twice is harmless by design: job messages are only hints (a worker claims a job in the
database, and a job that is no longer queued is skipped), and events carry a per-job `seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import timedelta

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel
from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.broker import BrokerUnavailable, start_producer
from conveyor.database import Database
from conveyor.models import OutboxMessage, utcnow

log = structlog.get_logger(__name__)

# A row older than this is taken to be left behind by a process that died before publishing it.
ORPHAN_AGE_S = 10.0
SWEEP_INTERVAL_S = 1.0
BATCH_SIZE = 500
# After a failure to reach Kafka, wait this long (doubling up to the cap) before trying again.
RETRY_BASE_S = 0.5
RETRY_CAP_S = 10.0


def stage_message(session: AsyncSession, topic: str, key: str, message: BaseModel) -> OutboxMessage:
    """Add a message to the outbox, in the caller's transaction."""
    row = OutboxMessage(topic=topic, key=key, value=message.model_dump_json().encode(), created_at=utcnow())
    session.add(row)
    return row


class OutboxRelay:
    """Publishes outbox rows to Kafka in id order, then deletes them.

    `publish(ids)` publishes the rows a caller has just committed and returns once they are on Kafka
    (or leaves them for the sweep if Kafka is down). The background sweep publishes orphans.
    """

    def __init__(self, db: Database, bootstrap: str) -> None:
        self._db = db
        self._bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._pending: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        async with self._lock:
            await self._drain(sweep=False)
            await self._close_producer()

    async def publish(self, rows: Iterable[OutboxMessage]) -> bool:
        """Publish freshly committed rows now. True if they reached Kafka; else the relay retries them."""
        self._pending.update(row.id for row in rows)
        async with self._lock:
            return await self._drain(sweep=False)

    def notify(self, rows: Iterable[OutboxMessage]) -> None:
        """Hand freshly committed rows to the background relay without waiting for Kafka."""
        self._pending.update(row.id for row in rows)
        self._wake.set()

    @property
    def healthy(self) -> bool:
        return self._failures == 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = loop.time()
        while True:
            if self._failures:
                # Kafka is failing: retry on a backoff, not at every new row.
                await asyncio.sleep(self._backoff())
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=SWEEP_INTERVAL_S)
            self._wake.clear()
            sweep = loop.time() - last_sweep >= SWEEP_INTERVAL_S
            if sweep:
                last_sweep = loop.time()
            async with self._lock:
                await self._drain(sweep=sweep or self._failures > 0)

    def _backoff(self) -> float:
        return float(min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(self._failures, 10)))

    async def _drain(self, sweep: bool) -> bool:
        try:
            while True:
                wanted = sorted(self._pending)[:BATCH_SIZE]
                rows = await self._load(wanted, sweep)
                if rows:
                    await self._send(rows)
                    await self._delete([row.id for row in rows])
                # A wanted row that is not found was published and deleted by another relay's sweep.
                self._pending.difference_update(wanted)
                self._failures = 0
                if len(rows) < BATCH_SIZE and not self._pending:
                    return True
        except (KafkaError, BrokerUnavailable, OSError) as exc:
            self._failures += 1
            log.warning("outbox.publish_failed", error=str(exc), failures=self._failures)
            await self._close_producer()
            return False

    async def _load(self, ids: list[int], sweep: bool) -> list[OutboxMessage]:
        conditions: list[ColumnElement[bool]] = []
        if ids:
            conditions.append(OutboxMessage.id.in_(ids))
        if sweep:
            conditions.append(OutboxMessage.created_at < utcnow() - timedelta(seconds=ORPHAN_AGE_S))
        if not conditions:
            return []
        async with self._db.session() as session:
            query = select(OutboxMessage).where(or_(*conditions)).order_by(OutboxMessage.id).limit(BATCH_SIZE)
            return list((await session.scalars(query)).all())

    async def _send(self, rows: list[OutboxMessage]) -> None:
        if self._producer is None:
            self._producer = await start_producer(self._bootstrap)
        # Sent in id order through one producer: messages with the same key keep their order.
        futures = [
            await self._producer.send(row.topic, key=row.key.encode(), value=row.value) for row in rows
        ]
        await asyncio.gather(*futures)

    async def _delete(self, ids: list[int]) -> None:
        async with self._db.session() as session:
            await session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))

    async def _close_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await asyncio.gather(producer.stop(), return_exceptions=True)
