"""Per-tenant limits on submissions: a rate (token bucket) and a cap on jobs waiting to run.

Each gateway instance keeps its own buckets, so N instances admit up to N times a tenant's rate;
the cap on waiting jobs is counted in the database, once per batch of submissions and tenant
(`conveyor.changes`), and holds across instances (give or take the batches other instances commit
at the same moment).
"""

from __future__ import annotations

import math

from conveyor.problems import Problem, invalid_field, too_many_requests
from conveyor.settings import TenantLimits
from conveyor.tokenbucket import TokenBucket

# What a client over its queued-jobs cap is told to wait: jobs leave the queue as workers take them.
QUEUE_FULL_RETRY_AFTER_S = 5


class SubmissionLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, tenant: str, limits: TenantLimits, count: int = 1) -> None:
        """Raise a 429 if `count` more jobs would take the tenant past its rate."""
        bucket = self._buckets.get(tenant)
        if bucket is None or (bucket.rate, bucket.burst) != (limits.submit_rate, limits.submit_burst):
            bucket = self._buckets[tenant] = TokenBucket(limits.submit_rate, limits.submit_burst)
        wait_s = bucket.take(count=count)
        if wait_s > 0:
            raise too_many_requests(
                f"more than {limits.submit_rate:g} submissions per second", math.ceil(wait_s), "rate"
            )


def queue_full(waiting: int, limits: TenantLimits, wanted: int = 1) -> Problem:
    """The 429 for a tenant whose jobs waiting to run leave no room for `wanted` more."""
    more = "" if wanted == 1 else f"; {wanted} more do not fit"
    return too_many_requests(
        f"{waiting} jobs are already waiting to run (limit {limits.max_queued}){more}",
        QUEUE_FULL_RETRY_AFTER_S,
        "max_queued",
    )


def too_large_for_burst(count: int, limits: TenantLimits) -> Problem:
    """A batch larger than the tenant's burst could never be admitted: the client must split it."""
    return invalid_field("jobs", f"at most {limits.submit_burst} jobs at once for this tenant (its burst)")
