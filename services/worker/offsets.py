"""Which offset a partition may commit: never past a job that has not reached a recorded state.

Jobs of one partition run concurrently and finish out of order. The committable offset is the
smallest offset still in flight (Kafka's committed offset names the next record to read), or one
past the highest offset seen when nothing is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class PartitionOffsets:
    in_flight: set[int] = field(default_factory=set)
    highest_seen: int = -1
    committed: int = -1

    def committable(self) -> int | None:
        """The offset to commit now, or None if there is nothing new to commit."""
        target = min(self.in_flight) if self.in_flight else self.highest_seen + 1
        return target if target > self.committed and target > 0 else None


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, PartitionOffsets] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        partition = self._partitions.setdefault(tp, PartitionOffsets())
        partition.in_flight.add(offset)
        partition.highest_seen = max(partition.highest_seen, offset)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        partition = self._partitions.get(tp)
        if partition is not None:
            partition.in_flight.discard(offset)

    def committable(self, partitions: set[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        return {
            tp: offset
            for tp, state in self._partitions.items()
            if (partitions is None or tp in partitions) and (offset := state.committable()) is not None
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop partitions this worker no longer owns: their commits now belong to another member."""
        for tp in partitions:
            self._partitions.pop(tp, None)

    @property
    def partitions(self) -> set[TopicPartition]:
        return set(self._partitions)

    @property
    def in_flight(self) -> int:
        return sum(len(state.in_flight) for state in self._partitions.values())
