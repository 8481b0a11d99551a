"""Which prefetched job a free slot takes: weighted shares between the priority levels, and turns
between the partitions of one level.

Each priority level has a topic of its own. When several levels have jobs waiting, each free slot goes
to one level, chosen by start-time fair queuing (stride scheduling): a level's jobs carry virtual
start tags `1/weight` apart, and the slot goes to the level with the earliest tag, the more urgent
level on a tie. While every level is backlogged, any run of 31 slots splits 16:8:4:2:1 (the default
`CONVEYOR_PRIORITY_WEIGHTS`), interleaved rather than in runs, and any subset of levels shares by its
own weights: p1 and p5 alone split 16:1, so the least urgent level still moves.

A level with nothing waiting saves up no credit: when it has work again its tag starts at the current
virtual time, so it cannot come back with a burst and hold up the others. Nor does it queue behind
them: no level has an earlier tag, and ties go to the more urgent level. So a top-priority job that
arrives behind any backlog takes the next free slot (a few slots later at most, if another p1 job was
served in the same turn). Smooth weighted round-robin, as nginx balances upstreams, gives the same
shares to a fixed set of levels, but levels come and go here: with credit frozen while a level is idle,
the leftovers of a busy spell keep a returning p1 waiting; with credit reset, p5 can starve while the
levels above it flicker.

Within a level the partitions take turns. Jobs are keyed by tenant, so one tenant's flood fills only a
few partitions; taking turns keeps that flood from sitting in front of the other tenants of the same
level on this worker.

Nothing here talks to Kafka: the worker loop asks for the order in which to try its partitions and
says which one it served.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from aiokafka import TopicPartition

from conveyor.settings import DEFAULT_PRIORITY_WEIGHTS
from conveyor.topics import PRIORITIES, job_topic


class PriorityPicker:
    """Start-time fair queuing over the priority levels, in whole numbers.

    Virtual time advances by the start tag of each slot's level. Strides are `lcm(weights) // weight`,
    so a weight-16 level moves 1 step per slot it gets and a weight-1 level 16: in any span of virtual
    time every backlogged level gets slots in proportion to its weight, exactly.
    """

    def __init__(self, weights: Sequence[int] = DEFAULT_PRIORITY_WEIGHTS) -> None:
        if len(weights) != len(PRIORITIES):
            raise ValueError(f"expected {len(PRIORITIES)} weights, one per priority, got {len(weights)}")
        if any(weight < 1 for weight in weights):
            raise ValueError("every priority weight must be at least 1")
        period = math.lcm(*weights)
        self._stride = {level: period // weight for level, weight in zip(PRIORITIES, weights, strict=True)}
        # Where each level's next job would start if it has one; behind `_now` once it has been idle.
        self._next_start = dict.fromkeys(PRIORITIES, 0)
        self._now = 0

    def _start(self, level: int) -> int:
        return max(self._next_start[level], self._now)

    def order(self, levels: Iterable[int]) -> list[int]:
        """`levels` in the order the next slot should try them: earliest start first, urgent on a tie."""
        return sorted(levels, key=lambda level: (self._start(level), level))

    def served(self, level: int) -> None:
        """`level` got the slot: virtual time moves to its start, and its next job starts a stride later."""
        self._now = self._start(level)
        self._next_start[level] = self._now + self._stride[level]

    def pick(self, ready: Iterable[int]) -> int:
        """The level that gets the next slot, among the `ready` ones (those with work waiting)."""
        level = self.order(ready)[0]
        self.served(level)
        return level


class PartitionOrder:
    """The order in which a free slot tries the worker's partitions: levels as the picker ranks them,
    and within a level round-robin, from the partition after the one served last."""

    def __init__(self, prefix: str, weights: Sequence[int] = DEFAULT_PRIORITY_WEIGHTS) -> None:
        self.picker = PriorityPicker(weights)
        self._level_of_topic = {job_topic(prefix, level): level for level in PRIORITIES}
        self._last_served: dict[int, TopicPartition] = {}

    def level_of(self, tp: TopicPartition) -> int | None:
        return self._level_of_topic.get(tp.topic)

    def candidates(self, assignment: Iterable[TopicPartition]) -> list[TopicPartition]:
        """Every job partition of `assignment`, most deserving first."""
        by_level: dict[int, list[TopicPartition]] = {}
        for tp in assignment:
            level = self.level_of(tp)
            if level is not None:
                by_level.setdefault(level, []).append(tp)
        ordered: list[TopicPartition] = []
        for level in self.picker.order(by_level):
            ordered.extend(self._turns(level, sorted(by_level[level])))
        return ordered

    def _turns(self, level: int, partitions: list[TopicPartition]) -> list[TopicPartition]:
        last = self._last_served.get(level)
        after = sum(1 for tp in partitions if last is not None and tp <= last)
        return partitions[after:] + partitions[:after]

    def served(self, tp: TopicPartition) -> None:
        """A slot took a job from `tp`."""
        level = self.level_of(tp)
        if level is not None:
            self.picker.served(level)
            self._last_served[level] = tp
