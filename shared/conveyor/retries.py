"""When a failed attempt is retried: exponential backoff with full jitter.

The wait before attempt n+1 is drawn uniformly from [0, min(cap, base * 2 ** (n - 1))]. Drawing
from the whole range ("full jitter") spreads out jobs that failed together, say when a dependency
went down, so they do not all come back at the same instant and knock it over again.

The retry is durable: the job waits in the database as `scheduled`, with `run_at` set to its retry
time, and the workers' scheduler queues it then, exactly as it does a job submitted with `run_at`.
Nothing lives in a worker's memory, so a restart of every worker loses no retry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.background import exponential_delay
from conveyor.models import utcnow


@dataclass(frozen=True)
class Backoff:
    base_s: float
    cap_s: float

    def ceiling_s(self, attempt: int) -> float:
        """The longest wait after the `attempt`-th attempt failed (attempts count from 1)."""
        # Attempt 0 (nothing has run yet) waits at most the base, as attempt 1 does.
        return exponential_delay(max(attempt, 1), self.base_s, self.cap_s)

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """A random wait in [0, ceiling]: full jitter."""
        return (rng or random).uniform(0.0, self.ceiling_s(attempt))

    def retry_at(
        self, attempt: int, now: datetime | None = None, rng: random.Random | None = None
    ) -> datetime:
        return (now or utcnow()) + timedelta(seconds=self.delay_s(attempt, rng))
