"""Per-tenant limits on submissions: a rate (token bucket) and a cap on jobs waiting to run.

Each gateway instance keeps its own buckets, so N instances admit up to N times a tenant's rate;
the cap on waiting jobs is counted in the database and holds across instances (give or take the
submissions in flight at the same moment).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from conveyor.problems import Problem
from conveyor.settings import TenantLimits

# What a client over its queued-jobs cap is told to wait: jobs leave the queue as workers take them.
QUEUE_FULL_RETRY_AFTER_S = 5


@dataclass
class TokenBucket:
    rate: float
    burst: int
    tokens: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        now = time.monotonic() if now is None else now
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class SubmissionLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, tenant: str, limits: TenantLimits) -> None:
        """Raise a 429 if the tenant submits faster than its rate allows."""
        bucket = self._buckets.get(tenant)
        if bucket is None or (bucket.rate, bucket.burst) != (limits.submit_rate, limits.submit_burst):
            bucket = self._buckets[tenant] = TokenBucket(limits.submit_rate, limits.submit_burst)
        wait_s = bucket.take()
        if wait_s > 0:
            raise too_many_requests(
                f"more than {limits.submit_rate:g} submissions per second", math.ceil(wait_s), "rate"
            )


def check_queue_room(waiting: int, limits: TenantLimits) -> None:
    """Raise a 429 if the tenant already has its maximum of jobs waiting to run."""
    if waiting >= limits.max_queued:
        raise too_many_requests(
            f"{waiting} jobs are already waiting to run (limit {limits.max_queued})",
            QUEUE_FULL_RETRY_AFTER_S,
            "max_queued",
        )


def too_many_requests(detail: str, retry_after_s: int, limit: str) -> Problem:
    return Problem(
        429,
        "Too many requests",
        detail,
        slug="rate-limited",
        headers={"Retry-After": str(max(1, retry_after_s))},
        limit=limit,
    )
