"""The outbox relay: nothing committed is lost while Kafka is unreachable, and no row Kafka refuses
holds up the rows behind it."""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from conveyor.broker import ensure_topics
from conveyor.database import Database
from conveyor.embedded.kafka import free_port_block
from conveyor.events import Progress
from conveyor.outbox import MESSAGE_REFUSED, OutboxRelay, stage_messages
from conveyor.sizes import DEFAULT_MAX_MESSAGE_BYTES
from conveyor.topics import events_topic

from harness import eventually, outbox_size


async def topics_and_database(kafka_bootstrap: str, database_url: str) -> tuple[str, Database]:
    """A topic prefix of the test's own with its topics (one partition each), and the migrated database."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    await ensure_topics(kafka_bootstrap, prefix, partitions=1, replication_factor=1)
    db = Database(database_url)
    await db.migrate()
    return prefix, db


async def test_rows_wait_while_kafka_is_unreachable_and_flow_once_it_answers(
    database_url: str, kafka_bootstrap: str
) -> None:
    prefix, db = await topics_and_database(kafka_bootstrap, database_url)
    messages = [
        (
            events_topic(prefix),
            "job-1",
            Progress(percent=n, message=str(n)).model_dump_json().encode(),
            None,
            None,
        )
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

    values = await _read(kafka_bootstrap, events_topic(prefix), 5)
    assert [value["message"] for value in values] == ["0", "1", "2", "3", "4"], "all of them, in order"


async def _empty(db: Database) -> bool:
    return await outbox_size(db) == 0


def _event(n: int, result: str | None = None) -> bytes:
    """An event-like message: a stand-in leaves out its `result`."""
    return json.dumps({"seq": n, "status": "succeeded", "result": result, "error": None}).encode()


async def _read(bootstrap: str, topic: str, count: int) -> list[dict[str, Any]]:
    """The first `count` messages of a topic of one partition, in order."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    values: list[dict[str, Any]] = []

    async def read_all() -> bool:
        batches = await consumer.getmany(timeout_ms=500)
        values.extend(json.loads(record.value) for records in batches.values() for record in records)
        return len(values) >= count

    try:
        await eventually(read_all, 30, f"{count} messages on {topic}")
    finally:
        await consumer.stop()
    return values


def _refused_count(topic: str) -> float:
    return REGISTRY.get_sample_value("conveyor_outbox_rows_refused_total", {"topic": topic}) or 0.0


async def test_the_sweep_sets_aside_a_row_too_large_for_the_producer_and_the_rows_behind_it_flow(
    database_url: str, kafka_bootstrap: str
) -> None:
    prefix, db = await topics_and_database(kafka_bootstrap, database_url)
    topic = events_topic(prefix)
    # Larger than aiokafka's own 1 MiB max_request_size, and than the relay's (DEFAULT_MAX_MESSAGE_BYTES).
    huge = "x" * (DEFAULT_MAX_MESSAGE_BYTES + 512 * 1024)
    messages = [(topic, "job-1", _event(1), None, None), (topic, "job-1", _event(2, huge), None, None)]
    messages += [(topic, f"job-{n}", _event(n), None, None) for n in range(3, 6)]
    # Left behind by a process that died before publishing: the live relay's orphan sweep finds them.
    await db.write(lambda connection: stage_messages(connection, messages))
    refused_before = _refused_count(topic)

    live = OutboxRelay(db, kafka_bootstrap)
    await live.start()
    try:
        await eventually(lambda: _empty(db), 40, "the outbox to drain past the refused row")
    finally:
        await live.stop()
        await db.close()

    values = await _read(kafka_bootstrap, topic, 5)
    assert [value["seq"] for value in values] == [1, 2, 3, 4, 5]
    stand_in = values[1]
    assert stand_in["result"] is None and stand_in["status"] == "succeeded"
    assert stand_in["error"]["type"] == MESSAGE_REFUSED
    assert "MessageSizeTooLargeError" in stand_in["error"]["message"]
    assert _refused_count(topic) == refused_before + 1


async def test_a_row_the_topic_refuses_is_set_aside_and_the_rows_behind_it_are_published(
    database_url: str, kafka_bootstrap: str
) -> None:
    """The broker's refusal (the topic's max.message.bytes is below the producer's limit, as on a topic
    created by hand): the row is set aside too, and the relay goes on."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    topic = events_topic(prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "20000"})])
    finally:
        await admin.close()
    db = Database(database_url)
    await db.migrate()
    messages = [
        (topic, "job-1", _event(1), None, None),
        (topic, "job-1", _event(2, "y" * 100_000), None, None),
    ]
    messages += [(topic, f"job-{n}", _event(n), None, None) for n in range(3, 6)]
    rows = await db.write(lambda connection: stage_messages(connection, messages))
    relay = OutboxRelay(db, kafka_bootstrap)
    await relay.start()
    try:
        # The broker's refusal fails the round (the rows behind it on the partition fail as out of
        # order); the relay's next round sends the stand-in in the refused row's place, and the rest.
        await relay.publish(rows)
        await eventually(lambda: _empty(db), 30, "the published and the refused rows to be deleted")
        more = await db.write(
            lambda connection: stage_messages(connection, [(topic, "job-6", _event(6), None, None)])
        )
        assert await relay.publish(more) is True, "the relay goes on publishing"
        await eventually(lambda: _empty(db), 30, "the last row to be deleted")
    finally:
        await relay.stop()
        await db.close()

    values = await _read(kafka_bootstrap, topic, 6)
    # Rows acknowledged before the failed round are sent again with it: a repeat, harmless by design.
    assert sorted({value["seq"] for value in values}) == [1, 2, 3, 4, 5, 6]
    stand_ins = [value for value in values if value["seq"] == 2]
    assert stand_ins and all(value["result"] is None for value in stand_ins)
    assert {value["error"]["type"] for value in stand_ins} == {MESSAGE_REFUSED}
