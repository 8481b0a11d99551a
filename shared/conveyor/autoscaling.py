"""The autoscaling policy of `conveyor run`: how many worker processes the work in Kafka calls for.

Pure: it sees one sample at a time (the jobs outstanding, when) and the count of workers now, and
returns the count it wants and its state for the next sample. The supervisor's autoscaler
(`conveyor.autoscaler`) takes the samples and starts or drains the processes.

- **Outstanding work** is the workers' consumer lag on the job topics: messages published and not
  yet committed past, i.e. jobs waiting to start plus jobs running (a worker commits only past jobs
  whose outcome is recorded). One worker has `slots_per_worker` slots (`CONVEYOR_WORKER_CONCURRENCY`).
- **Scale out** when there are more jobs outstanding than the workers have slots, so that jobs wait
  for a slot, for `scale_out_after_s` on end: straight to as many workers as give every outstanding
  job a slot (within the bounds). A burst the workers clear within the window starts nothing.
- **Scale in** when the outstanding jobs would fit in one worker fewer at most half full
  (SCALE_IN_UTILISATION), idle included, for `scale_in_after_s` on end: one worker at a time, at
  least `scale_in_step_s` apart. The gap between the two thresholds keeps a steady load from
  flapping between two counts.
- Never below `minimum` nor above `maximum` (which the caller holds to the job topics' partitions:
  a worker beyond them would own no partition). A count outside the bounds is brought inside at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# How long the workers must be too few, on end, before more are started: long enough that a short
# burst the current workers clear by themselves starts nothing.
SCALE_OUT_AFTER_S = 5.0
# How long the workers must be too many, on end, before one is drained, and the gap between two
# drains: idle, four workers are back to one in about SCALE_IN_AFTER_S + 2 * SCALE_IN_STEP_S.
SCALE_IN_AFTER_S = 60.0
SCALE_IN_STEP_S = 10.0
# Scale in only while the work would fill one worker fewer at most this much.
SCALE_IN_UTILISATION = 0.5


@dataclass(frozen=True)
class Policy:
    minimum: int
    maximum: int
    slots_per_worker: int
    scale_out_after_s: float = SCALE_OUT_AFTER_S
    scale_in_after_s: float = SCALE_IN_AFTER_S
    scale_in_step_s: float = SCALE_IN_STEP_S

    def __post_init__(self) -> None:
        if not 0 <= self.minimum <= self.maximum:
            raise ValueError(f"need 0 <= minimum <= maximum, got {self.minimum} and {self.maximum}")
        if self.slots_per_worker < 1:
            raise ValueError("a worker has at least one slot")

    def clamp(self, count: int) -> int:
        return min(self.maximum, max(self.minimum, count))

    def workers_for(self, outstanding: int) -> int:
        """Enough workers to give every outstanding job a slot, within the bounds."""
        return self.clamp(math.ceil(outstanding / self.slots_per_worker))

    def fits_one_fewer(self, outstanding: int, current: int) -> bool:
        """Whether one worker fewer would be at most SCALE_IN_UTILISATION full."""
        return outstanding <= (current - 1) * self.slots_per_worker * SCALE_IN_UTILISATION


@dataclass(frozen=True)
class State:
    """What the policy remembers between samples (monotonic seconds)."""

    short_since: float | None = None  # since when the workers have been too few, on end
    surplus_since: float | None = None  # since when they have been too many
    last_scale_in_at: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    # Why: "steady", "short" (too few, waiting out the window), "scale_out", "surplus", "scale_in",
    # "bounds" (brought inside minimum..maximum).
    reason: str
    state: State


def decide(policy: Policy, state: State, current: int, outstanding: int, now: float) -> Decision:
    """The workers wanted, given `current` workers and `outstanding` jobs sampled at `now`."""
    if policy.clamp(current) != current:
        return Decision(policy.clamp(current), "bounds", State(last_scale_in_at=state.last_scale_in_at))
    wanted = policy.workers_for(outstanding)
    if wanted > current:
        short_since = state.short_since if state.short_since is not None else now
        settled = State(short_since=short_since, last_scale_in_at=state.last_scale_in_at)
        if now - short_since >= policy.scale_out_after_s:
            return Decision(wanted, "scale_out", replace(settled, short_since=None))
        return Decision(current, "short", settled)
    if current > policy.minimum and policy.fits_one_fewer(outstanding, current):
        surplus_since = state.surplus_since if state.surplus_since is not None else now
        settled = State(surplus_since=surplus_since, last_scale_in_at=state.last_scale_in_at)
        last = state.last_scale_in_at
        if now - surplus_since >= policy.scale_in_after_s and (
            last is None or now - last >= policy.scale_in_step_s
        ):
            return Decision(current - 1, "scale_in", replace(settled, last_scale_in_at=now))
        return Decision(current, "surplus", settled)
    return Decision(current, "steady", State(last_scale_in_at=state.last_scale_in_at))
