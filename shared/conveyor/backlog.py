"""What waits, read every few seconds for the gauges: the workers' consumer lag and the outbox.

`conveyor_consumer_lag_messages{priority}` is read from Kafka (each job partition's end offset minus
the workers' group's committed offset, summed by priority level) and `conveyor_outbox_rows` /
`conveyor_outbox_oldest_age_seconds` from the database, by one task every `BACKLOG_INTERVAL_S`, never per
job or per scrape: a scrape only reads the gauges. The gateway runs it, not the workers: the lag
matters most when no worker is running at all (a backlog behind workers that scaled to zero, or all
died). Every gateway instance reads the same values, so aggregate them with `max`, not `sum`.

A reading that fails (Kafka or the database away) is logged and its gauges are cleared rather than
left at a stale value; the other reading still goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from conveyor.background import BackgroundTask
from conveyor.broker import ADMIN_TIMEOUT_MS
from conveyor.database import Database
from conveyor.metrics import CONSUMER_LAG, OUTBOX_OLDEST_AGE, OUTBOX_ROWS
from conveyor.outbox import backlog
from conveyor.topics import PRIORITIES, job_topic, worker_group

log = structlog.get_logger(__name__)

# Often enough for an alert over minutes and for a dashboard; a reading is one aggregate query and
# four Kafka requests.
BACKLOG_INTERVAL_S = 5.0
# One reading may take this long at most (Kafka or the database slow); then it counts as failed.
READING_TIMEOUT_S = 10.0


def lag_by_priority(
    prefix: str,
    end: Mapping[TopicPartition, int],
    start: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
) -> dict[int, int]:
    """Messages not yet committed by the workers' group, per priority level. A partition the group has
    never committed on is read from its log start (the workers' `auto_offset_reset` is `earliest`)."""
    topics = {job_topic(prefix, priority): priority for priority in PRIORITIES}
    lag = dict.fromkeys(PRIORITIES, 0)
    for tp, end_offset in end.items():
        priority = topics.get(tp.topic)
        if priority is None:
            continue
        position = committed.get(tp, -1)
        if position < 0:
            position = start.get(tp, 0)
        lag[priority] += max(0, end_offset - position)
    return lag


class BacklogGauges:
    def __init__(
        self, db: Database, bootstrap: str, prefix: str, interval_s: float = BACKLOG_INTERVAL_S
    ) -> None:
        self._db = db
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._interval_s = interval_s
        self._task = BackgroundTask("backlog-gauges", self._run)
        # Kept from one reading to the next (a connection each time would cost the broker more than the
        # reading); made again after a failure.
        self._consumer: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None

    async def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            await self.read()
            await asyncio.sleep(self._interval_s)

    async def read(self) -> None:
        """One reading of both: the outbox, then the lag."""
        try:
            async with asyncio.timeout(READING_TIMEOUT_S):
                rows, oldest_age_s = await self._db.read(backlog)
        except Exception as exc:
            log.warning("backlog.outbox_unread", error=str(exc) or type(exc).__name__)
            OUTBOX_ROWS.set(float("nan"))
            OUTBOX_OLDEST_AGE.set(float("nan"))
        else:
            OUTBOX_ROWS.set(rows)
            OUTBOX_OLDEST_AGE.set(oldest_age_s)
        try:
            async with asyncio.timeout(READING_TIMEOUT_S):
                lag = await self._lag()
        except Exception as exc:
            log.warning("backlog.lag_unread", error=str(exc) or type(exc).__name__)
            CONSUMER_LAG.clear()
            await self._disconnect()
        else:
            for priority, messages in lag.items():
                CONSUMER_LAG.labels(str(priority)).set(messages)

    async def _lag(self) -> dict[int, int]:
        consumer, admin = await self._connected()
        topics = [job_topic(self._prefix, priority) for priority in PRIORITIES]
        # Asked each time: partitions added since the last reading count too.
        partitions = [
            TopicPartition(described["topic"], partition["partition"])
            for described in await admin.describe_topics(topics)
            if described["error_code"] == 0
            for partition in described["partitions"]
        ]
        if not partitions:
            return dict.fromkeys(PRIORITIES, 0)
        end = await consumer.end_offsets(partitions)
        start = await consumer.beginning_offsets(partitions)
        offsets = await admin.list_consumer_group_offsets(worker_group(self._prefix), partitions=partitions)
        committed = {tp: meta.offset for tp, meta in offsets.items()}
        return lag_by_priority(self._prefix, end, start, committed)

    async def _connected(self) -> tuple[AIOKafkaConsumer, AIOKafkaAdminClient]:
        if self._consumer is None or self._admin is None:
            await self._disconnect()
            # No group: this consumer only asks for offsets, it never joins the workers' group.
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS
            )
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self._bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS
            )
            self._consumer, self._admin = consumer, admin
            await consumer.start()
            await admin.start()
        return self._consumer, self._admin

    async def _disconnect(self) -> None:
        consumer, admin = self._consumer, self._admin
        self._consumer = self._admin = None
        for client in (consumer, admin):
            if client is None:
                continue
            try:
                await (client.stop() if isinstance(client, AIOKafkaConsumer) else client.close())
            except Exception as exc:  # a client that never connected; nothing to keep of it
                log.debug("backlog.disconnect_failed", error=str(exc))
