"""Kafka access behind small, named functions: producers, consumers and topic administration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from conveyor.sizes import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TOPIC_MAX_MESSAGE_BYTES
from conveyor.topics import all_topics, events_topic, job_topics

# Acknowledged by every in-sync replica, idempotent: an accepted write survives a broker's loss
# and a retried send is not duplicated.
PRODUCER_ACKS = "all"
# Wait this long for more messages before a produce request: fewer, fuller requests cost the broker
# (and every producer) less CPU per message, for a few milliseconds of latency.
PRODUCER_LINGER_MS = 5
PRODUCER_REQUEST_TIMEOUT_MS = 10_000
ADMIN_TIMEOUT_MS = 10_000
# Stopping a consumer talks to the broker (leaving the group); while it is down that could wait forever.
CONSUMER_STOP_TIMEOUT_S = 5.0
TOPIC_ALREADY_EXISTS = 36
# A topic created a moment ago may not be in every broker's metadata yet (a fresh cluster of several
# is slower to agree): its partitions are asked for again, this often, for at most this long.
TOPIC_METADATA_WAIT_S = 15.0
TOPIC_METADATA_RETRY_S = 0.25
# The progress service's reader of the events topic: the broker answers as soon as it has an event, or
# after 500 ms with none (Kafka's defaults). Waiting for 16 KiB instead (up to 20 ms) held each event
# ~15 ms at a few dozen events a second: p50 31 -> 15 ms in bench/progress_fanout.py at 2,000
# subscribers. Under load, each answer carries what came while the last one was handled.
EVENTS_FETCH_MIN_BYTES = 1
EVENTS_FETCH_MAX_WAIT_MS = 500
# Kafka's default of the bytes one fetch takes per partition; more when the topics take larger messages.
KAFKA_PARTITION_FETCH_BYTES = 1024 * 1024
# Keep a week of events and jobs: long enough to replay a backlog after an outage.
TOPIC_RETENTION_MS = 7 * 24 * 3600 * 1000


class BrokerUnavailable(Exception):
    """Kafka could not be reached or refused the request."""


def create_producer(bootstrap: str, max_request_size: int = DEFAULT_MAX_MESSAGE_BYTES) -> AIOKafkaProducer:
    """The producer of a process's outbox relay. It refuses (MessageSizeTooLargeError, at `send`) a
    message larger than `max_request_size`, which is below the topics' `max.message.bytes`
    (`conveyor.sizes`): the broker never sees a message it would refuse."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=PRODUCER_ACKS,
        enable_idempotence=True,
        linger_ms=PRODUCER_LINGER_MS,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        max_request_size=max_request_size,
    )


async def start_producer(
    bootstrap: str, max_request_size: int = DEFAULT_MAX_MESSAGE_BYTES
) -> AIOKafkaProducer:
    producer = create_producer(bootstrap, max_request_size)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise BrokerUnavailable(str(exc)) from exc
    return producer


def create_job_consumer(
    bootstrap: str, prefix: str, group_id: str, listener: ConsumerRebalanceListener, **options: Any
) -> AIOKafkaConsumer:
    """A consumer in the workers' group, on every priority topic, committing offsets by hand."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **options,
    )
    subscribe_to_jobs(consumer, prefix, listener)
    return consumer


def subscribe_to_jobs(consumer: AIOKafkaConsumer, prefix: str, listener: ConsumerRebalanceListener) -> None:
    """Join the workers' group on every priority topic (again, after `consumer.unsubscribe()`)."""
    consumer.subscribe(job_topics(prefix), listener=listener)


async def start_events_consumer(
    bootstrap: str, prefix: str, max_message_bytes: int = DEFAULT_TOPIC_MAX_MESSAGE_BYTES
) -> AIOKafkaConsumer:
    """A consumer of every partition of the events topic, with no group (every reader sees every
    event), positioned at the topic's end as of now. It fetches up to `max_message_bytes` (the
    topics' `max.message.bytes`) per partition: an event at the limit comes in one fetch."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        # An event as soon as it is there (EVENTS_FETCH_MIN_BYTES).
        fetch_min_bytes=EVENTS_FETCH_MIN_BYTES,
        fetch_max_wait_ms=EVENTS_FETCH_MAX_WAIT_MS,
        max_partition_fetch_bytes=max(max_message_bytes, KAFKA_PARTITION_FETCH_BYTES),
    )
    topic = events_topic(prefix)
    assignment = [TopicPartition(topic, partition) for partition in await topic_partitions(bootstrap, topic)]
    await consumer.start()
    try:
        consumer.assign(assignment)
        await consumer.seek_to_end(*assignment)
        for tp in assignment:
            # Resolve the position now, so "the end" is this moment rather than the first fetch.
            await consumer.position(tp)
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def stop_consumer(consumer: AIOKafkaConsumer, timeout_s: float = CONSUMER_STOP_TIMEOUT_S) -> bool:
    """Stop a consumer (a group member leaves its group), giving up after `timeout_s`; True if it
    stopped cleanly. Safe while the broker is down, when aiokafka's fetcher may be in a retry sleep
    that its own `close` cancels and then lets escape as a CancelledError."""
    stopping = asyncio.ensure_future(consumer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
    if not done:
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        return False
    # The stop ran in a task of its own, so a CancelledError here is aiokafka's, never ours.
    return not stopping.cancelled() and stopping.exception() is None


@asynccontextmanager
async def admin_client(bootstrap: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client for one task: Kafka's errors come out as BrokerUnavailable, and it is closed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS)
    try:
        await admin.start()
        yield admin
    except KafkaError as exc:
        raise BrokerUnavailable(str(exc)) from exc
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, topic: str) -> list[int]:
    """The topic's partitions. A topic the broker does not know (yet) is asked for again for up to
    TOPIC_METADATA_WAIT_S: every service creates the topics it needs just before it asks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TOPIC_METADATA_WAIT_S
    async with admin_client(bootstrap) as admin:
        while True:
            described = await admin.describe_topics([topic])
            if described and described[0]["error_code"] == 0 and described[0]["partitions"]:
                return sorted(partition["partition"] for partition in described[0]["partitions"])
            if loop.time() >= deadline:
                raise BrokerUnavailable(f"topic {topic!r} does not exist")
            await asyncio.sleep(TOPIC_METADATA_RETRY_S)


async def missing_topics(bootstrap: str, prefix: str) -> list[str]:
    async with admin_client(bootstrap) as admin:
        existing = set(await admin.list_topics())
    return [topic for topic in all_topics(prefix) if topic not in existing]


async def committed_offsets(
    bootstrap: str, group: str, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """The group's committed offset of each partition (the next record it reads); -1 where it has none."""
    async with admin_client(bootstrap) as admin:
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
    return {tp: committed[tp].offset if tp in committed else -1 for tp in partitions}


async def log_start_offsets(bootstrap: str, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """The first offset each partition still holds: records before it were deleted (retention, a
    `kafka-delete-records`, a recreated topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        await consumer.start()
        offsets: dict[TopicPartition, int] = await consumer.beginning_offsets(partitions)
    except KafkaError as exc:
        raise BrokerUnavailable(str(exc)) from exc
    finally:
        await stop_consumer(consumer)
    return offsets


def min_insync_replicas(replication_factor: int) -> int:
    """The topics' `min.insync.replicas`: one broker of the replicas may be down without stopping
    writes (2 at a factor of 3, 1 at 2)."""
    return max(1, replication_factor - 1)


async def ensure_topics(
    bootstrap: str,
    prefix: str,
    partitions: int,
    replication_factor: int,
    events_partitions: int | None = None,
    max_message_bytes: int = DEFAULT_TOPIC_MAX_MESSAGE_BYTES,
) -> list[str]:
    """Create whichever of the project's topics do not exist yet; returns the ones it created. The job
    topics get `partitions`; the events and dead-letter topics `events_partitions` (the same, unless
    given): their readers read every partition, so more of them only cost the broker. Every topic
    takes messages up to `max_message_bytes` (`conveyor.sizes.topic_max_message_bytes`)."""
    missing = await missing_topics(bootstrap, prefix)
    if not missing:
        return []
    config = {"retention.ms": str(TOPIC_RETENTION_MS), "max.message.bytes": str(max_message_bytes)}
    if replication_factor > 1:
        # One replica fewer than the factor: writes go on with one broker down, at any factor. At 3 a
        # write acknowledged with acks=all is on two brokers and survives the loss of either; at 2 it
        # may be on one alone while the other is down (the price of staying writable).
        config["min.insync.replicas"] = str(min_insync_replicas(replication_factor))
    async with admin_client(bootstrap) as admin:
        response = await admin.create_topics(
            [
                NewTopic(
                    topic,
                    partitions if topic in job_topics(prefix) else events_partitions or partitions,
                    replication_factor,
                    topic_configs=config,
                )
                for topic in missing
            ],
            timeout_ms=ADMIN_TIMEOUT_MS,
        )
    failures = [
        f"{topic}: {message or code}"
        for topic, code, message, *_ in response.topic_errors
        if code not in (0, TOPIC_ALREADY_EXISTS)
    ]
    if failures:
        raise BrokerUnavailable("could not create topics: " + "; ".join(failures))
    return missing
