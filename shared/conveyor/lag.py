"""The workers' consumer lag: per job topic partition, its end offset minus the group's committed one.

A worker commits only past jobs whose outcome is recorded (`services.worker.offsets`), so the lag
counts the jobs waiting to start and the jobs running: the outstanding work, as KEDA's Kafka scaler
sees it too. A partition the group never committed counts from its log start (the workers start
there: `auto_offset_reset="earliest"`).

One read is a FindCoordinator and an OffsetFetch for the group, and a ListOffsets per partition
leader (two for partitions with no committed offset): a few requests whatever the backlog, nothing
per job, and nothing on the database.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from conveyor.broker import ADMIN_TIMEOUT_MS, BrokerUnavailable, stop_consumer
from conveyor.topics import PRIORITIES, job_topic, worker_group


class GroupLag:
    """Reads the workers' lag on every job topic; `start` first, `stop` at the end."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self._bootstrap = bootstrap
        self._group = worker_group(prefix)
        self._topics = job_topic_levels(prefix)
        self._clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None
        self.partitions: list[TopicPartition] = []

    async def start(self) -> None:
        """Connect, and learn the job topics' partitions (again, after a failed start)."""
        await self.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS)
        # Outside the group: it only asks for offsets, it never reads a message.
        offsets = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=ADMIN_TIMEOUT_MS,
        )
        self._clients = admin, offsets
        try:
            await admin.start()
            await offsets.start()
            described = await admin.describe_topics(list(self._topics))
        except KafkaError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        missing = [topic["topic"] for topic in described if topic["error_code"] != 0]
        if missing:
            raise BrokerUnavailable(f"job topics missing: {missing}")
        self.partitions = sorted(
            TopicPartition(topic["topic"], partition["partition"])
            for topic in described
            for partition in topic["partitions"]
        )

    async def stop(self) -> None:
        if self._clients is not None:
            admin, offsets = self._clients
            self._clients = None
            await admin.close()
            await stop_consumer(offsets)

    def fewest_partitions(self) -> int:
        """The partitions of the job topic that has the fewest: more workers than this idle on it."""
        counts = {topic: 0 for topic in self._topics}
        for tp in self.partitions:
            counts[tp.topic] += 1
        return min(counts.values())

    async def by_priority(self) -> dict[int, int]:
        """The lag of each priority level's topic, in messages."""
        if self._clients is None:
            raise BrokerUnavailable("not started")
        admin, offsets = self._clients
        try:
            committed = await admin.list_consumer_group_offsets(self._group, partitions=self.partitions)
            ends = await offsets.end_offsets(self.partitions)
            never_committed = [tp for tp in self.partitions if _offset(committed.get(tp)) < 0]
            starts = await offsets.beginning_offsets(never_committed) if never_committed else {}
        except KafkaError as exc:
            raise BrokerUnavailable(str(exc)) from exc
        positions = {tp: _offset(committed.get(tp)) for tp in self.partitions}
        return lag_by_priority(self._topics, ends, starts, positions)

    async def total(self) -> int:
        return sum((await self.by_priority()).values())


def lag_by_priority(
    topics: Mapping[str, int],
    end: Mapping[TopicPartition, int],
    start: Mapping[TopicPartition, int],
    committed: Mapping[TopicPartition, int],
) -> dict[int, int]:
    """Messages not yet committed by the workers' group, per priority level (`topics`: job topic to
    its level; other topics are left out). A partition the group never committed on (-1) counts from
    its log start."""
    lag = dict.fromkeys(topics.values(), 0)
    for tp, end_offset in end.items():
        priority = topics.get(tp.topic)
        if priority is None:
            continue
        position = committed.get(tp, -1)
        if position < 0:
            position = start.get(tp, 0)
        lag[priority] += max(0, end_offset - position)
    return lag


def job_topic_levels(prefix: str) -> dict[str, int]:
    """Each job topic of the prefix, to its priority level."""
    return {job_topic(prefix, priority): priority for priority in PRIORITIES}


def _offset(metadata: object) -> int:
    """The committed offset of an OffsetAndMetadata, -1 for none."""
    offset = getattr(metadata, "offset", -1)
    return int(offset) if offset is not None else -1
