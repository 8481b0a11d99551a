"""The job messages a worker has read from Kafka and not started yet, and which one each free slot takes.

The worker loop moves records out of the consumer's buffer into the intake as soon as they arrive, up
to `read_ahead` per partition, so a slot can choose among more than the head of each partition. Each
free slot takes one job: from the priority level whose turn it is (`PriorityPicker`: 16:8:4:2:1 by
default), and within that level from the tenant whose turn it is (`TenantTurns`), oldest first.

That is where fairness between tenants lives. A tenant's jobs are keyed by job id and so spread over
every partition, which lets one tenant keep every worker busy; the price is that a partition holds
every tenant's jobs in arrival order. Reading ahead lets a slot reach past one tenant's flood to
another tenant's job, as far as the read-ahead goes: a tenant whose backlog on one partition is deeper
than that still delays the others' jobs on the same partition until the backlog ahead of them fits.
Priority levels have topics of their own, so no backlog of one level ever sits in front of another.

A record in the intake counts as in flight for the offset tracker, so no commit passes it: a worker
that dies with a full intake loses nothing, its records are read again by the next owner.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiokafka import TopicPartition

from conveyor.events import JobMessage
from conveyor.settings import DEFAULT_PRIORITY_WEIGHTS
from conveyor.topics import PRIORITIES, job_topic
from services.worker.priorities import PriorityPicker, TenantTurns

# Job messages read ahead per partition by default (CONVEYOR_WORKER_READ_AHEAD).
DEFAULT_READ_AHEAD = 1000


@dataclass(frozen=True, slots=True)
class Pending:
    """A job message read from Kafka, waiting for a slot."""

    tp: TopicPartition
    offset: int
    message: JobMessage
    # When the message was published (its Kafka timestamp, in seconds since the epoch), for the time its
    # job waited in the queue (`conveyor_job_queue_wait_seconds`); None if unknown.
    published_at: float | None = None
    # The trace context in the message's headers (`conveyor.tracing`: a carrier), if any.
    trace: str | None = None


class _Level:
    """One priority level's waiting jobs: a queue per tenant, and whose turn it is."""

    def __init__(self, weight_of: Callable[[str], int]) -> None:
        self.queues: dict[str, deque[Pending]] = {}
        self.turns = TenantTurns(weight_of)

    def add(self, pending: Pending) -> None:
        tenant = pending.message.tenant
        queue = self.queues.get(tenant)
        if queue is None:
            queue = self.queues[tenant] = deque()
        queue.append(pending)
        self.turns.join(tenant)

    def take(self) -> Pending:
        tenant = self.turns.current()
        queue = self.queues[tenant]
        pending = queue.popleft()
        if not queue:
            del self.queues[tenant]
        self.turns.served(more_waiting=bool(queue))
        return pending

    def drop(self, partitions: set[TopicPartition]) -> list[Pending]:
        dropped: list[Pending] = []
        for tenant in list(self.queues):
            kept = deque(pending for pending in self.queues[tenant] if pending.tp not in partitions)
            dropped.extend(pending for pending in self.queues[tenant] if pending.tp in partitions)
            if kept:
                self.queues[tenant] = kept
            else:
                del self.queues[tenant]
                self.turns.leave(tenant)
        return dropped


class Intake:
    def __init__(
        self,
        prefix: str,
        weights: Sequence[int] = DEFAULT_PRIORITY_WEIGHTS,
        tenant_weight: Callable[[str], int] = lambda tenant: 1,
        read_ahead: int = DEFAULT_READ_AHEAD,
    ) -> None:
        self.picker = PriorityPicker(weights)
        self.read_ahead = read_ahead
        self._level_of_topic = {job_topic(prefix, level): level for level in PRIORITIES}
        self._levels = {level: _Level(tenant_weight) for level in PRIORITIES}
        self._per_partition: Counter[TopicPartition] = Counter()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def level_of(self, tp: TopicPartition) -> int | None:
        return self._level_of_topic.get(tp.topic)

    def with_room(self, assignment: Iterable[TopicPartition]) -> list[TopicPartition]:
        """The job partitions of `assignment` whose read-ahead is not full: the ones to read now."""
        return [
            tp
            for tp in assignment
            if tp.topic in self._level_of_topic and self._per_partition[tp] < self.read_ahead
        ]

    def by_level(self, partitions: Iterable[TopicPartition]) -> list[list[TopicPartition]]:
        """Job partitions grouped by priority level, the top level first."""
        groups: dict[int, list[TopicPartition]] = {}
        for tp in partitions:
            level = self.level_of(tp)
            if level is not None:
                groups.setdefault(level, []).append(tp)
        return [groups[level] for level in sorted(groups)]

    def add(self, pending: Pending) -> None:
        level = self.level_of(pending.tp)
        if level is None:  # the consumer reads only the priority topics
            raise ValueError(f"{pending.tp.topic} is no priority topic")
        self._levels[level].add(pending)
        self._per_partition[pending.tp] += 1
        self._size += 1

    def take(self, count: int) -> list[Pending]:
        """Up to `count` jobs, one per slot, each from the level and then the tenant whose turn it is."""
        taken: list[Pending] = []
        while len(taken) < count and self._size:
            ready = [level for level, waiting in self._levels.items() if waiting.turns]
            level = self.picker.pick(ready)
            pending = self._levels[level].take()
            self._per_partition[pending.tp] -= 1
            self._size -= 1
            taken.append(pending)
        return taken

    def put_back(self, pending: Iterable[Pending]) -> None:
        """Jobs taken but not started (their claim could not be written): waiting again."""
        for item in pending:
            self.add(item)

    def drop(self, partitions: set[TopicPartition]) -> list[Pending]:
        """Forget the records of partitions this worker no longer owns; the ones dropped."""
        dropped = [pending for level in self._levels.values() for pending in level.drop(partitions)]
        for tp in partitions:
            self._per_partition.pop(tp, None)
        self._size -= len(dropped)
        return dropped
