"""Metrics: how many attempts started, how many ended by each ending, and how long they ran.

They live in prometheus_client's default registry (`prometheus_client.REGISTRY`). Nothing exposes
them over HTTP yet: a worker has no metrics endpoint, so for now they can only be read in-process.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, Histogram

from services.worker.attempt import Ending, Execution
from services.worker.middleware import Middleware

# The `ending` label of an attempt whose handler never started (its type or payload was refused).
NOT_STARTED = "not_started"
# Attempts run from a few milliseconds (noop jobs) to hours.
DURATION_BUCKETS_S = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)

ATTEMPTS_STARTED = Counter("conveyor_worker_attempts_started", "Attempts this worker started.")
ATTEMPTS_ENDED = Counter(
    "conveyor_worker_attempts_ended", "Attempts whose handler ended, by how it ended.", ["ending"]
)
ATTEMPT_DURATION = Histogram(
    "conveyor_worker_attempt_duration_seconds",
    "From an attempt's start to its handler's end, by how it ended.",
    ["ending"],
    buckets=DURATION_BUCKETS_S,
)


class Metrics(Middleware):
    def before_start(self, execution: Execution) -> None:
        ATTEMPTS_STARTED.inc()

    def after_attempt(self, execution: Execution, ending: Ending | None) -> None:
        label = NOT_STARTED if ending is None else ending.value
        ATTEMPTS_ENDED.labels(ending=label).inc()
        ran_s = asyncio.get_running_loop().time() - execution.began_at
        ATTEMPT_DURATION.labels(ending=label).observe(ran_s)
