"""The outbox relay: nothing committed is lost while Kafka is unreachable."""

from __future__ import annotations

import json
import uuid

from aiokafka import AIOKafkaConsumer

from conveyor.broker import ensure_topics
from conveyor.database import Database
from conveyor.embedded.kafka import free_port_block
from conveyor.events import Progress
from conveyor.outbox import OutboxRelay, stage_messages
from conveyor.topics import events_topic

from harness import eventually, outbox_size


async def test_rows_wait_while_kafka_is_unreachable_and_flow_once_it_answers(
    database_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    await ensure_topics(kafka_bootstrap, prefix, partitions=1, replication_factor=1)
    db = Database(database_url)
    await db.migrate()
    messages = [
        (events_topic(prefix), "job-1", Progress(percent=n, message=str(n)).model_dump_json().encode(), None)
        for n in range(5)
    ]
    rows = await db.write(lambda connection: stage_messages(connection, messages))

    dead = OutboxRelay(db, f"127.0.0.1:{free_port_block(1)}")  # nothing listens there
    assert await dead.publish(rows) is False
    assert await outbox_size(db) == 5
    await dead.stop()

    live = OutboxRelay(db, kafka_bootstrap)
    await live.start()  # its sweep finds the rows the dead relay left behind
    try:
        # The rows are orphans to the live relay: it publishes them once they are ORPHAN_AGE_S old.
        await eventually(lambda: _empty(db), 30, "the outbox to drain")
    finally:
        await live.stop()
        await db.close()

    consumer = AIOKafkaConsumer(
        events_topic(prefix), bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    values: list[dict[str, object]] = []

    async def read_five() -> bool:
        batches = await consumer.getmany(timeout_ms=500)
        values.extend(json.loads(record.value) for records in batches.values() for record in records)
        return len(values) >= 5

    try:
        await eventually(read_five, 30, "the five messages")
    finally:
        await consumer.stop()
    assert [value["message"] for value in values] == ["0", "1", "2", "3", "4"], "all of them, in order"


async def _empty(db: Database) -> bool:
    return await outbox_size(db) == 0
