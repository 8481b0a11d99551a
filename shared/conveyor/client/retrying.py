"""When the client tries a request again, and how long it waits first.

Only answers that say nothing was done are retried (503, 429, and a connection that failed before
the request was sent), plus, for requests that are safe to repeat (reads, and submissions, which carry
an idempotency key), a connection cut before the answer came. The server's `Retry-After` is honoured;
without one the wait is exponential with full jitter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from conveyor.client.errors import ConveyorError, RateLimited, Unavailable

DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF_BASE_S = 0.5
DEFAULT_BACKOFF_CAP_S = 10.0
# A `Retry-After` longer than this is not waited out: the error goes to the caller instead.
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S

    def delay_s(self, retry: int, error: ConveyorError | httpx.TransportError) -> float | None:
        """How long to wait before retry number `retry` (1, 2, ...) after `error`; None: do not retry."""
        if retry > self.max_retries:
            return None
        if isinstance(error, RateLimited | Unavailable) and error.retry_after is not None:
            return error.retry_after if error.retry_after <= MAX_RETRY_AFTER_S else None
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (retry - 1)))


NO_RETRIES = RetryPolicy(max_retries=0)


def retryable(error: ConveyorError | httpx.TransportError, *, repeatable: bool) -> bool:
    """Whether `error` may be retried: the server did nothing, or the request is safe to repeat."""
    if isinstance(error, RateLimited | Unavailable):
        return True
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # the request was never sent
    return repeatable and isinstance(error, httpx.TransportError)
