"""Lost job messages: a queued job whose Kafka message is gone is published again.

A job message can be lost with replication factor 1 (a broker's disk), by retention passing over a
backlog, by a topic deleted and created again, or by a bug; its job would stay `queued` for good, and
count against its tenant's `max_queued`. So the relay records where each job message landed
(`job_message_positions`) when the broker acknowledges it, and every worker,
every STRAY_CHECK_INTERVAL_S, looks at the jobs queued for longer than `CONVEYOR_STRAY_GRACE_S` and asks
Kafka about their partitions:

- an offset below the workers' committed offset was consumed, yet its job was never claimed;
- an offset below the partition's log start was deleted.

Either job is published again (`changes.republish`) and runs once. A job whose message is at or past
both is waiting in a backlog, however long, and is left alone. A job queued by a version that recorded
no positions has none, and is not checked. Workers sweep side by side: a job published twice is
claimed once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import timedelta

import structlog
from aiokafka import TopicPartition
from sqlalchemy import Connection, select

from conveyor import changes
from conveyor.background import every
from conveyor.broker import committed_offsets, log_start_offsets
from conveyor.clock import database_now
from conveyor.lifecycle import JobState
from conveyor.models import JOB_MESSAGE_POSITIONS, JOBS
from conveyor.topics import job_topic, worker_group
from services.worker.context import WorkerContext

log = structlog.get_logger(__name__)

# How often a worker looks, at most: the grace, halved, within these bounds.
STRAY_CHECK_MIN_INTERVAL_S = 1.0
STRAY_CHECK_MAX_INTERVAL_S = 30.0
# Queued jobs looked at per round, the longest waiting first.
STRAY_BATCH = 1000


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A queued job, and where its latest job message landed."""

    job_id: str
    tp: TopicPartition
    offset: int


def queued_long_ago(connection: Connection, prefix: str, grace_s: float, limit: int) -> list[QueuedMessage]:
    """Jobs queued (or last changed) more than `grace_s` ago whose message's position is known."""
    before = database_now(connection) - timedelta(seconds=grace_s)
    positions = JOB_MESSAGE_POSITIONS
    query = (
        select(JOBS.c.id, JOBS.c.priority, positions.c.partition, positions.c.offset)
        .join(positions, positions.c.job_id == JOBS.c.id)
        .where(JOBS.c.status == JobState.QUEUED.value, JOBS.c.updated_at < before)
        .order_by(JOBS.c.updated_at)
        .limit(limit)
    )
    return [
        QueuedMessage(job_id, TopicPartition(job_topic(prefix, priority), partition), offset)
        for job_id, priority, partition, offset in connection.execute(query)
    ]


def lost(
    queued: list[QueuedMessage], committed: dict[TopicPartition, int], log_start: dict[TopicPartition, int]
) -> list[QueuedMessage]:
    """The messages consumed without a claim (below the committed offset) or deleted (below the log
    start); the rest are waiting."""
    return [
        message
        for message in queued
        if message.offset < committed.get(message.tp, -1) or message.offset < log_start.get(message.tp, 0)
    ]


class StraySweep:
    def __init__(self, context: WorkerContext) -> None:
        self._context = context
        settings = context.settings
        self._grace_s = settings.stray_grace_s
        interval_s = min(STRAY_CHECK_MAX_INTERVAL_S, max(STRAY_CHECK_MIN_INTERVAL_S, self._grace_s / 2))
        self._chore = every(interval_s, self.sweep, name="stray-sweep", failure_event="stray.sweep_failed")

    def start(self) -> None:
        self._chore.start()

    async def stop(self) -> None:
        await self._chore.stop()

    async def sweep(self) -> int:
        """Publish again the queued jobs whose messages are lost; how many."""
        settings = self._context.settings
        queued = await self._context.db.read(
            functools.partial(
                queued_long_ago, prefix=settings.topic_prefix, grace_s=self._grace_s, limit=STRAY_BATCH
            )
        )
        if not queued:
            return 0
        partitions = sorted({message.tp for message in queued})
        group = worker_group(settings.topic_prefix)
        committed = await committed_offsets(settings.kafka_bootstrap, group, partitions)
        log_start = await log_start_offsets(settings.kafka_bootstrap, partitions)
        strays = lost(queued, committed, log_start)
        if not strays:
            return 0
        strays.sort(key=lambda message: message.job_id)  # rows locked in id order, as by every writer
        results = await self._context.committer.apply([changes.republish(m.job_id) for m in strays])
        republished = 0
        for message, result in zip(strays, results, strict=True):
            if result.written:
                republished += 1
                log.warning(
                    "job.republished",
                    job_id=message.job_id,
                    topic=message.tp.topic,
                    partition=message.tp.partition,
                    offset=message.offset,
                    committed=committed.get(message.tp),
                    log_start=log_start.get(message.tp),
                )
        return republished
