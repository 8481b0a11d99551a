"""Metrics: how many attempts started, how many ended by each ending, and how long they ran (by ending,
and by job type: `conveyor_job_run_seconds`).

They live in prometheus_client's default registry (`prometheus_client.REGISTRY`), which the worker
serves on its metrics port (`conveyor.metrics_server`). The jobs' outcomes are counted where
they are committed (`conveyor.jobmetrics`), not here: an outcome the database refuses is not one.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor import metrics
from conveyor.metrics import WORKER_SLOTS_NAME
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
        if ending is not None:  # a handler ran
            series = metrics.jobs()
            series.labelled(series.run, execution.job.type, *series.tenant(execution.job.tenant)).observe(
                ran_s
            )


class _Slots(Protocol):
    """What the slots gauge reads of a worker: how many handlers run, out of how many at most."""

    @property
    def busy(self) -> int: ...

    @property
    def concurrency(self) -> int: ...


class WorkerSlots(Collector):
    """`conveyor_worker_slots{state="busy"|"free"}`: read from the workers of this process when scraped,
    so running a job costs nothing more. (One worker per process but in tests, which may run several.)"""

    def __init__(self) -> None:
        self._workers: weakref.WeakSet[Any] = weakref.WeakSet()

    def watch(self, worker: _Slots) -> None:
        self._workers.add(worker)

    def collect(self) -> Iterable[Metric]:
        busy = sum(worker.busy for worker in self._workers)
        capacity = sum(worker.concurrency for worker in self._workers)
        gauge = GaugeMetricFamily(
            WORKER_SLOTS_NAME,
            "The worker's job slots, running a handler (busy) or not (free).",
            labels=["state"],
        )
        gauge.add_metric(["busy"], busy)
        gauge.add_metric(["free"], max(0, capacity - busy))
        yield gauge


SLOTS = WorkerSlots()
REGISTRY.register(SLOTS)
