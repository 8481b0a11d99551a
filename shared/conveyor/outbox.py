"""The transactional outbox: Kafka messages are written in the same transaction as the state they announce,
then published by a relay. A process that dies between its commit and its publish loses nothing: the
relay of any live process sweeps rows that have waited longer than `ORPHAN_AGE_S` and publishes them.

Publishing twice is harmless by design: job messages are only hints (a worker claims a job in the
database, and a job that is no longer queued is skipped), and events carry a per-job `seq`.

A row Kafka refuses for good (too large for the producer or the topic: `REFUSED_ERRORS`) would be
re-read first forever and hold up every row behind it, so it is set aside: logged
(`outbox.row_refused`), counted (`conveyor_outbox_rows_refused_total`), replaced on Kafka by a stand-in
(the same message without its `result` or `payload`, with an `error` that says why: a live client
still sees the event's `seq` and status, and reads the result from the API) and deleted. The producer
refuses at `send` what is over its limit, and the stand-in takes the row's place at once. What only the
broker refuses (a topic whose `max.message.bytes` is below the producer's limit) is known once the
acknowledgements come back, when the idempotent producer's sequence on that partition is already
broken (the messages behind it fail as out of order): the round fails, the producer is replaced, and
when the rows are sent again the stand-in goes in the refused row's place. Other errors (Kafka away, a
timeout) are retried: they say nothing about the row.

Where each job message landed (partition and offset, as acknowledged) is recorded in
`job_message_positions`, in the transaction that deletes its outbox row, so it costs no transaction
of its own: the workers' sweep for lost messages reads it (`services/worker/strays.py`).

With tracing on, each row is published in a `publish <topic>` span (a producer span) under the trace
context the row was staged with (`headers`), and the message carries the span's context in its Kafka
headers (W3C `traceparent`), for the worker or the progress service to continue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import Counter
from sqlalchemy import ColumnElement, Connection, Insert, Table, delete, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from conveyor import tracing
from conveyor.background import BackgroundTask, exponential_delay
from conveyor.broker import BrokerUnavailable, start_producer
from conveyor.clock import database_now
from conveyor.database import Database
from conveyor.jsoncodec import dumps, loads
from conveyor.models import JOB_MESSAGE_POSITIONS, OutboxMessage, utcnow
from conveyor.sizes import DEFAULT_MAX_MESSAGE_BYTES
from conveyor.topics import is_job_topic

log = structlog.get_logger(__name__)

# A row older than this is taken to be left behind by a process that died before publishing it.
ORPHAN_AGE_S = 10.0
SWEEP_INTERVAL_S = 1.0
BATCH_SIZE = 500
# Published rows are deleted in batches: at most this often, or sooner once this many wait.
DELETE_INTERVAL_S = 0.5
DELETE_BATCH = 2000
# Ids per DELETE statement: PostgreSQL's drivers take at most 32,767 parameters a statement.
DELETE_CHUNK = 1000
# After a failure to reach Kafka, wait this long (doubling up to the cap) before trying again.
RETRY_BASE_S = 0.5
RETRY_CAP_S = 10.0
# The idempotent producer never gives up on a batch by itself, so during a broker outage an
# acknowledgement could be awaited for as long as the outage lasts. Past this, the rows count as not
# sent: they wait in the outbox, the relay backs off and re-reads them, and a late duplicate is harmless.
ACK_TIMEOUT_S = 15.0
# How long stopping may spend publishing what is left, and closing the producer; the rest stays in the
# outbox for the next relay.
STOP_TIMEOUT_S = 5.0
PUBLISH_ERRORS = (KafkaError, BrokerUnavailable, OSError, TimeoutError)
# What Kafka answers about a row itself, and will answer again however often it is sent: the message is
# larger than the producer's max_request_size (raised by `send`) or the topic's max.message.bytes (the
# broker's answer). Not every error aiokafka calls non-retriable: KafkaTimeoutError is one, and an
# authorization or configuration error is about the cluster, not the row; dropping rows for those would
# lose every message of an outage.
REFUSED_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)
# The `error.type` of a stand-in for a refused message.
MESSAGE_REFUSED = "message_refused"
# The fields a stand-in leaves out: the ones that grow with what a tenant or handler sent.
LARGE_FIELDS = ("result", "payload")

ROWS_REFUSED = Counter(
    "conveyor_outbox_rows_refused",
    "Outbox rows Kafka refused for good (too large), set aside so the rows behind them flow.",
    ["topic"],
)


OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A committed outbox row, as the relay publishes it."""

    id: int
    topic: str
    key: str
    value: bytes
    # The partition to publish to; None lets the key choose it (Kafka's default partitioner).
    partition: int | None = None
    # The trace context it was staged in (`conveyor.tracing`: a carrier), or None.
    headers: str | None = None


def backlog(connection: Connection) -> tuple[int, float]:
    """How many rows wait in the outbox, and the age of the oldest in seconds (by the database's clock,
    which stamped them); 0 and 0.0 when it is empty. One aggregate query, for the gauges."""
    count, oldest = connection.execute(select(func.count(), func.min(OUTBOX.c.created_at))).one()
    if not count or oldest is None:
        return 0, 0.0
    if oldest.tzinfo is None:  # SQLite hands an aggregate back as it is stored, without its zone
        oldest = oldest.replace(tzinfo=UTC)
    return int(count), max(0.0, (database_now(connection) - oldest).total_seconds())


# A message to stage: topic, key, value, the partition if it is not the key's, and its trace context.
Message = tuple[str, str, bytes, int | None, str | None]


# A row queued on the producer, with the future of its acknowledgement.
Queued = tuple[OutboxRow, asyncio.Future[Any]]


def stage_messages(
    connection: Connection, messages: Sequence[Message], now: datetime | None = None
) -> list[OutboxRow]:
    """Add `(topic, key, value, partition, headers)` messages to the outbox, in the caller's transaction,
    in order."""
    if not messages:
        return []
    created_at = now or utcnow()
    returned = connection.execute(
        insert(OUTBOX).returning(OUTBOX.c.id),
        [
            {
                "topic": topic,
                "key": key,
                "value": value,
                "partition": partition,
                "headers": headers,
                "created_at": created_at,
            }
            for topic, key, value, partition, headers in messages
        ],
    )
    # One multi-row INSERT: the rows take their ids in the order of their values, ascending (SQLite's
    # next rowid, PostgreSQL's sequence), whatever order RETURNING lists them in. Sorting pairs them
    # up without asking for RETURNING in parameter order, which SQLAlchemy gets on SQLite by inserting
    # row by row.
    ids = sorted(row.id for row in returned)
    return [OutboxRow(id, *message) for id, message in zip(ids, messages, strict=True)]


class OutboxRelay:
    """Publishes outbox rows to Kafka in id order, then deletes them.

    Fresh rows are handed over in memory by the process that committed them (`publish` waits until
    they are on Kafka, `notify` does not), so the hot path reads nothing back from the database, and
    the deletes of published rows are batched in the background. After a failure to reach Kafka, rows
    are re-read from the database in id order until the backlog is gone, so a job's events keep
    their order. The background sweep also publishes orphans left by dead processes.
    """

    def __init__(
        self, db: Database, bootstrap: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self._db = db
        self._bootstrap = bootstrap
        self._max_message_bytes = max_message_bytes
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._fresh: list[OutboxRow] = []  # committed, handed over in memory, not yet sent
        self._pending: set[int] = set()  # committed, to be re-read from the database and sent
        self._published: set[int] = set()  # sent, to be deleted
        self._wake = asyncio.Event()
        self._loop = BackgroundTask("outbox-relay", self._run)
        self._failures = 0
        # Rows the broker refused, by id: when they are sent again, their stand-ins go instead.
        self._refused: dict[int, KafkaError] = {}
        # Where job messages landed (partition, offset), by job id, to record with the next delete.
        self._landed: dict[str, tuple[int, int]] = {}

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush(), timeout=STOP_TIMEOUT_S)
        async with self._lock:
            await self._delete_published()
            await self._close_producer()

    async def publish(self, rows: Iterable[OutboxRow]) -> bool:
        """Publish freshly committed rows now. True if they reached Kafka; else the relay retries them."""
        published = await self._send_fresh(list(rows))
        self._wake.set()  # the background loop deletes what was published
        return published

    def notify(self, rows: Iterable[OutboxRow]) -> None:
        """Hand freshly committed rows to the background relay without waiting for Kafka."""
        self._fresh.extend(rows)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sweep = last_delete = loop.time()
        while True:
            if self._failures:
                # Kafka is failing: retry on a backoff, not at every new row.
                await asyncio.sleep(self._backoff())
            else:
                # Not `wait_for`: on Python 3.11 it swallows a cancel that comes as the event is set
                # (the stop right after a publish), and the relay would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SWEEP_INTERVAL_S):
                        await self._wake.wait()
            self._wake.clear()
            sweep = loop.time() - last_sweep >= SWEEP_INTERVAL_S
            if sweep:
                last_sweep = loop.time()
            try:
                await self._flush()
                async with self._lock:
                    if sweep or self._failures:
                        await self._drain(sweep=True)
                    if loop.time() - last_delete >= DELETE_INTERVAL_S or len(self._published) >= DELETE_BATCH:
                        last_delete = loop.time()
                        await self._delete_published()
            except (SQLAlchemyError, OSError) as exc:
                # The database is away: every row is still in the outbox, and the next round retries.
                log.warning("outbox.database_unavailable", error=str(exc))

    def _backoff(self) -> float:
        # One more than the failures: the first retry already waits twice the base.
        return exponential_delay(self._failures + 1, RETRY_BASE_S, RETRY_CAP_S)

    async def _flush(self) -> bool:
        """Send the rows handed over by `notify`."""
        rows, self._fresh = self._fresh, []
        return await self._send_fresh(rows)

    async def _send_fresh(self, rows: list[OutboxRow]) -> bool:
        """Send rows committed by this process. They are queued on the producer in order under the lock,
        and their acknowledgements awaited outside it, so concurrent callers share batches and round trips.
        While a backlog waits in the database, new rows join it instead, so order holds."""
        if not rows:
            return True
        async with self._lock:
            if self._pending:
                self._pending.update(row.id for row in rows)
                return await self._drain(sweep=False)
            try:
                queued = await self._enqueue(rows)
            except PUBLISH_ERRORS as exc:
                self._pending.update(row.id for row in rows)
                await self._failed(exc)
                return False
        try:
            await self._acknowledged(queued)
        except PUBLISH_ERRORS as exc:
            self._pending.update(row.id for row in rows)
            async with self._lock:
                await self._failed(exc)
            return False
        # Published, or set aside (its stand-in published in its place): either way, done with.
        self._published.update(row.id for row in rows)
        self._failures = 0
        return True

    async def _drain(self, sweep: bool) -> bool:
        """Re-read rows from the database (the backlog, and with `sweep` the orphans) and send them."""
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
        except PUBLISH_ERRORS as exc:
            await self._failed(exc)
            return False

    async def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        log.warning("outbox.publish_failed", error=str(exc), failures=self._failures)
        await self._close_producer()

    async def _delete_published(self) -> None:
        if not self._published:
            return
        ids, self._published = self._published, set()
        try:
            await self._delete(sorted(ids))
        except (SQLAlchemyError, OSError) as exc:
            # Harmless if it never happens: the sweep would publish these rows again, and a repeat is
            # dropped downstream. Try again on the next round.
            log.warning("outbox.delete_failed", error=str(exc))
            self._published |= ids

    async def _load(self, ids: list[int], sweep: bool) -> list[OutboxRow]:
        if not ids and not sweep:
            return []

        def load(connection: Connection) -> list[OutboxRow]:
            conditions: list[ColumnElement[bool]] = []
            if ids:
                conditions.append(OUTBOX.c.id.in_(ids))
            if sweep:
                # By the database's clock, which stamped the rows: a relay whose host runs ahead would
                # otherwise take other processes' fresh rows for orphans.
                orphaned_before = database_now(connection) - timedelta(seconds=ORPHAN_AGE_S)
                conditions.append(OUTBOX.c.created_at < orphaned_before)
            query = (
                select(
                    OUTBOX.c.id,
                    OUTBOX.c.topic,
                    OUTBOX.c.key,
                    OUTBOX.c.value,
                    OUTBOX.c.partition,
                    OUTBOX.c.headers,
                )
                .where(or_(*conditions))
                .order_by(OUTBOX.c.id)
                .limit(BATCH_SIZE)
            )
            return [OutboxRow(*row) for row in connection.execute(query)]

        return await self._db.read(load)

    async def _send(self, rows: list[OutboxRow]) -> None:
        """Publish rows; the ones Kafka refuses are set aside. Raises if Kafka fails otherwise."""
        await self._acknowledged(await self._enqueue(rows))

    async def _enqueue(self, rows: list[OutboxRow]) -> list[Queued]:
        """Queue rows on the producer in order, each with the future that resolves when Kafka
        acknowledges it. A row Kafka refused (the producer now, or the broker before) is set aside: its
        stand-in takes its place, so the messages of its key keep their order."""
        producer = await self._started_producer()
        queued: list[Queued] = []
        for row in rows:
            refusal = self._refused.pop(row.id, None)
            if refusal is None:
                # One producer, idempotent: messages with the same key reach Kafka in the order queued.
                span, headers = _publish_span(row)
                try:
                    ack = await producer.send(
                        row.topic,
                        key=row.key.encode(),
                        value=row.value,
                        partition=row.partition,
                        headers=headers,
                    )
                except REFUSED_ERRORS as exc:
                    _end_span(span, exc)
                    _record_refusal(row, exc)
                    refusal = exc
                else:
                    _end_span_on(ack, span)
                    queued.append((row, ack))
                    continue
            if (stand_in_ack := await self._queue_stand_in(producer, row, refusal)) is not None:
                queued.append((row, stand_in_ack))
        return queued

    async def _queue_stand_in(
        self, producer: AIOKafkaProducer, row: OutboxRow, exc: KafkaError
    ) -> asyncio.Future[Any] | None:
        """Queue a refused row's stand-in in its place, if it has one."""
        value = stand_in(row.value, exc)
        if value is None:
            return None
        span, headers = _publish_span(row)
        try:
            ack: asyncio.Future[Any] = await producer.send(
                row.topic, key=row.key.encode(), value=value, partition=row.partition, headers=headers
            )
        except REFUSED_ERRORS as again:  # not a message this small; but never loop on it
            _end_span(span, again)
            log.error("outbox.stand_in_refused", row_id=row.id, topic=row.topic, error=str(again))
            return None
        _end_span_on(ack, span)
        return ack

    async def _acknowledged(self, queued: list[Queued]) -> None:
        """Wait for Kafka to acknowledge every message, for at most ACK_TIMEOUT_S; raise the first error.
        A row the broker refused is remembered, for its stand-in to go instead when it is sent again.
        The futures are not cancelled on a timeout (they belong to the producer); whatever they end
        with is discarded."""
        if not queued:
            return
        acks = [ack for _, ack in queued]
        done, pending = await asyncio.wait(acks, timeout=ACK_TIMEOUT_S)
        for ack in pending:
            ack.add_done_callback(_discard_outcome)
        failure: BaseException | None = None
        for row, ack in queued:
            if ack not in done:
                continue
            try:
                landed = ack.result()  # raises the send's error, if any
                if is_job_topic(row.topic):
                    self._landed[row.key] = (landed.partition, landed.offset)
            except REFUSED_ERRORS as exc:
                _record_refusal(row, exc)
                self._refused[row.id] = exc
                failure = failure or exc
            except PUBLISH_ERRORS as exc:
                failure = failure or exc
        if pending:
            raise TimeoutError(f"Kafka acknowledged {len(done)} of {len(acks)} messages in {ACK_TIMEOUT_S} s")
        if failure is not None:
            raise failure

    async def _started_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = await start_producer(self._bootstrap, self._max_message_bytes)
        return self._producer

    async def _delete(self, ids: list[int]) -> None:
        """Delete published rows, and record where their job messages landed, in one transaction."""
        landed, self._landed = self._landed, {}

        def delete_rows(connection: Connection) -> None:
            for first in range(0, len(ids), DELETE_CHUNK):
                connection.execute(delete(OUTBOX).where(OUTBOX.c.id.in_(ids[first : first + DELETE_CHUNK])))
            if landed:
                record_positions(connection, landed)

        try:
            await self._db.write(delete_rows)
        except BaseException:
            # Not recorded: kept for the next delete (positions acknowledged since then win).
            self._landed = {**landed, **self._landed}
            raise

    async def _close_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            # Stopping flushes what the producer holds, which waits for the broker: bound it.
            await asyncio.gather(asyncio.wait_for(producer.stop(), STOP_TIMEOUT_S), return_exceptions=True)


def record_positions(connection: Connection, landed: dict[str, tuple[int, int]]) -> None:
    """Upsert where each job's latest job message landed, in job id order (as every writer orders the
    rows it locks: two relays cannot deadlock)."""
    positions = [
        {"job_id": job_id, "partition": partition, "offset": offset}
        for job_id, (partition, offset) in sorted(landed.items())
    ]
    connection.execute(_position_upsert(connection.dialect.name), positions)


def _position_upsert(dialect_name: str) -> Insert:
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(JOB_MESSAGE_POSITIONS)
    upsert: Insert = statement.on_conflict_do_update(
        index_elements=[JOB_MESSAGE_POSITIONS.c.job_id],
        set_={"partition": statement.excluded.partition, "offset": statement.excluded.offset},
    )
    return upsert


def _publish_span(row: OutboxRow) -> tuple[Span | None, list[tuple[str, bytes]] | None]:
    """The span of one row's publish, if this process traces and the row has a trace context, and the
    headers its message goes with: the span's context, or the row's own when not tracing (passed on, so
    the trace goes on past a relay that exports nothing). Each send of a row is a span of its own."""
    if row.headers is None:
        return None, None
    if not tracing.enabled():
        return None, tracing.headers_of(row.headers)
    span = tracing.start_child(
        f"publish {row.topic}",
        row.headers,
        SpanKind.PRODUCER,
        {
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.destination.name": row.topic,
            "messaging.kafka.message.key": row.key,
        },
    )
    return span, tracing.headers_of(tracing.carrier_of(span))


def _end_span_on(ack: asyncio.Future[Any], span: Span | None) -> None:
    """End the publish span once Kafka has answered: acknowledged, or with the error."""
    if span is not None:
        ack.add_done_callback(lambda done: _end_span(span, None if done.cancelled() else done.exception()))


def _end_span(span: Span | None, error: BaseException | None) -> None:
    if span is None:
        return
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


def _record_refusal(row: OutboxRow, exc: KafkaError) -> None:
    ROWS_REFUSED.labels(topic=row.topic).inc()
    log.error(
        "outbox.row_refused",
        row_id=row.id,
        topic=row.topic,
        key=row.key,
        size=len(row.value),
        error=str(exc) or type(exc).__name__,
    )


def stand_in(value: bytes, exc: KafkaError) -> bytes | None:
    """What is published instead of a refused message: the same document without its large fields, and
    with an `error` that says why (the message's own error, if any, kept as its `cause`). None if the
    message is not a JSON object (nothing to stand in for)."""
    try:
        document = loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    left_out = [name for name in LARGE_FIELDS if document.get(name) is not None]
    for name in left_out:
        document[name] = None
    error: dict[str, Any] = {
        "type": MESSAGE_REFUSED,
        "message": f"Kafka refused this message ({len(value)} bytes: {type(exc).__name__}); "
        f"left out: {', '.join(left_out) or 'nothing'}, which the database keeps",
    }
    if document.get("error") is not None:
        error["cause"] = document["error"]
    document["error"] = error
    return dumps(document)


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
