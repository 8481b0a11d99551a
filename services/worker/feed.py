"""The worker's side of Kafka: read job messages into the intake, and commit what is finished.

Records go from the consumer into the intake (`intake.py`) as they arrive, up to a read-ahead per
partition. An offset is committed only once every job before it on its partition has reached a
recorded state (`offsets.py`). While the database is out of reach the worker leaves the consumer group,
so its partitions go to workers that can claim their jobs, and joins again once it answers.
"""

from __future__ import annotations

import asyncio
import zlib

import structlog
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from conveyor import tracing
from conveyor.broker import create_job_consumer, stop_consumer, subscribe_to_jobs
from conveyor.events import JobMessage
from conveyor.settings import Settings
from conveyor.topics import worker_group
from services.worker.intake import Intake, Pending
from services.worker.offsets import OffsetTracker

log = structlog.get_logger(__name__)

# A partition no consumer is ever assigned. Polling only it returns nothing and leaves every prefetched
# record in place, yet counts as a poll: how a worker at capacity stays in its group.
NO_PARTITION = TopicPartition("", -1)
# How long the broker holds a fetch of empty partitions open (Kafka's default is 500 ms). The consumer
# has one fetch in flight at a time, and a partition that has just been emptied waits for it before it
# is fetched again: a short hold bounds how long a new p1 job can wait for that. A fetch is answered as
# soon as there is anything for it: asking for fuller fetches cost new jobs up to the hold in latency
# and saved nothing measurable once the collector was tuned (`conveyor.collector`).
FETCH_MAX_WAIT_MS = 100
# Records taken from the consumer per read, from each priority level in turn, so that a slot chooses
# among every level from the start. Parsing records holds the event loop while the free slots wait, so
# a read takes a bounded number rather than everything the consumer has fetched.
READ_BATCH_PER_LEVEL = 100
# The wait for records when the intake is empty takes this many, from whichever level has them.
READ_BATCH = 500
# Kafka calls that could block a stopping worker forever while the broker is down get this long.
COMMIT_TIMEOUT_S = 5.0


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, feed: JobFeed) -> None:
        self._feed = feed

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:  # aiokafka also calls this, with nothing, before the first assignment
            log.info(
                "worker.revoked",
                partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked),
                in_flight=self._feed.offsets.in_flight,
            )
        await self._feed.commit(set(revoked))
        self._feed.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("worker.assigned", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class JobFeed:
    """The consumer of the workers' group, created (not yet started) with the feed."""

    def __init__(self, settings: Settings, intake: Intake) -> None:
        self._prefix = settings.topic_prefix
        self.intake = intake
        self.offsets = OffsetTracker()
        self._listener = _CommitOnRevoke(self)
        self._consumer = create_job_consumer(
            settings.kafka_bootstrap,
            settings.topic_prefix,
            worker_group(settings.topic_prefix),
            listener=self._listener,
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        # False while the worker has left the consumer group because its database does not answer.
        self._in_group = True
        # The records whose jobs wait in the intake or run here, by partition and offset.
        self._held_records: set[tuple[TopicPartition, int]] = set()

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        # Leaves the group, so the partitions move to the other workers at once rather than after the
        # session timeout; bounded, since while the broker is down this could wait forever.
        if not await stop_consumer(self._consumer):
            log.warning("worker.consumer_stop_unclean")

    async def keep_membership(self, database_lost: bool) -> bool:
        """Leave the consumer group while the database is out of reach, and join again once it answers;
        whether the worker is in the group now. Without its database a worker cannot claim the jobs of
        its partitions; out of the group, those partitions go to workers that can."""
        if self._in_group and database_lost:
            await self.commit()
            self._consumer.unsubscribe()
            self.forget(self.offsets.partitions)
            self._in_group = False
            log.warning("worker.left_group", reason="the database does not answer")
        elif not self._in_group and not database_lost:
            subscribe_to_jobs(self._consumer, self._prefix, self._listener)
            self._in_group = True
            log.info("worker.rejoined_group")
        return self._in_group

    def partition_for(self, topic: str, job_id: str) -> int | None:
        """A partition of `topic` this worker consumes, for a job it takes over from a dead worker (the
        same one for the same job); None if it has none (the job's key then picks one)."""
        if not self._in_group:
            return None
        owned = sorted(tp.partition for tp in self._consumer.assignment() if tp.topic == topic)
        return owned[zlib.crc32(job_id.encode()) % len(owned)] if owned else None

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop what this worker read from partitions it no longer owns: their records will be read, and
        their commits made, by the next owner. Jobs of theirs that run here go on, and are recorded."""
        self.offsets.forget(partitions)
        for pending in self.intake.drop(partitions):
            self._held_records.discard((pending.tp, pending.offset))

    async def read(self, timeout_ms: int) -> None:
        """Move the records that have arrived into the intake, waiting up to `timeout_ms` for some. Only
        partitions whose read-ahead has room are read; a poll of none still counts as a poll."""
        partitions = self.intake.with_room(self._consumer.assignment())
        if not partitions:
            await self._consumer.getmany(NO_PARTITION, timeout_ms=0)
            if timeout_ms:
                await asyncio.sleep(timeout_ms / 1000)
            return
        if timeout_ms:
            batches = await self._consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=READ_BATCH)
            self._accept_all(batches)
            return
        # Without a wait, getmany hands out only what the consumer has fetched already.
        for level in self.intake.by_level(partitions):
            self._accept_all(await self._consumer.getmany(*level, max_records=READ_BATCH_PER_LEVEL))

    def _accept_all(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, records in batches.items():
            for record in records:
                self._accept(tp, record.offset, record.value, record.timestamp, record.headers)

    def _accept(
        self,
        tp: TopicPartition,
        offset: int,
        value: bytes,
        timestamp_ms: int | None = None,
        headers: tracing.Headers | None = None,
    ) -> None:
        self.offsets.started(tp, offset)
        if (tp, offset) in self._held_records:
            # A rebalance took the partition away and gave it back while the job ran, so it was read
            # again. Its first task still runs it and will release the offset when the job is recorded;
            # running it twice would skip the job at once and let the commit pass it while it runs.
            return
        try:
            message = JobMessage.model_validate_json(value)
        except ValidationError:
            log.error("worker.bad_message", topic=tp.topic, partition=tp.partition, offset=offset)
            self.offsets.finished(tp, offset)
            return
        self._held_records.add((tp, offset))
        published_at = timestamp_ms / 1000 if timestamp_ms is not None and timestamp_ms >= 0 else None
        self.intake.add(Pending(tp, offset, message, published_at, tracing.carrier_from_headers(headers)))

    def release(self, pending: Pending) -> None:
        """The record's job has reached a recorded state (or was not this worker's to run): its offset
        may be committed once those before it are too."""
        self._held_records.discard((pending.tp, pending.offset))
        self.offsets.finished(pending.tp, pending.offset)

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        offsets = self.offsets.committable(partitions)
        if not offsets:
            return
        try:
            # Bounded, so a broker outage cannot stall the loop (or a stopping worker) in a commit: what
            # is not committed is read again later, and its jobs, already recorded, are skipped.
            await asyncio.wait_for(self._consumer.commit(offsets), COMMIT_TIMEOUT_S)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("worker.commit_failed", error=str(exc) or type(exc).__name__)
            return
        self.offsets.mark_committed(offsets)
