"""Which fetched job a free slot takes: weighted shares between the priority levels, and turns between
the tenants of one level.

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

Within a level the tenants take turns (`TenantTurns`). One tenant's jobs spread over every partition
(they are keyed by job id, so that one tenant can keep every worker busy), so a partition holds every
tenant's jobs in arrival order; taking turns among what the worker has read ahead keeps one tenant's
flood from sitting in front of another tenant's job (`intake.py` holds what it has read).

Nothing here talks to Kafka.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from conveyor.settings import DEFAULT_PRIORITY_WEIGHTS
from conveyor.topics import PRIORITIES


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


class TenantTurns:
    """Weighted round-robin between the tenants that have jobs waiting at one priority level: each in
    turn gets as many slots in a row as its weight (1 unless `CONVEYOR_TENANT_LIMITS` gives it more),
    then goes to the back. A tenant whose jobs run out leaves the ring and comes back at its end, with no
    credit saved: a flood of one tenant's jobs waits behind every other tenant's next job, not the
    other way round."""

    def __init__(self, weight_of: Callable[[str], int]) -> None:
        self._weight_of = weight_of
        self._ring: deque[str] = deque()
        self._left: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._ring)

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._left

    def join(self, tenant: str) -> None:
        """The tenant has a job waiting now (it had none): it takes its place at the back."""
        if tenant not in self._left:
            self._ring.append(tenant)
            self._left[tenant] = max(1, self._weight_of(tenant))

    def current(self) -> str:
        """Whose turn it is."""
        return self._ring[0]

    def served(self, more_waiting: bool) -> None:
        """The current tenant got a slot; `more_waiting` says whether it still has jobs waiting."""
        tenant = self._ring[0]
        self._left[tenant] -= 1
        if not more_waiting:
            self._ring.popleft()
            del self._left[tenant]
        elif self._left[tenant] <= 0:
            self._ring.rotate(-1)
            self._left[tenant] = max(1, self._weight_of(tenant))

    def leave(self, tenant: str) -> None:
        """The tenant has nothing waiting any more (its records went with a partition)."""
        if tenant in self._left:
            self._ring.remove(tenant)
            del self._left[tenant]
