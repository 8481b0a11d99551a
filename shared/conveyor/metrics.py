"""The Prometheus series every Conveyor process exports, in one place: their names, labels and buckets.

Each process has its own registry (prometheus-client's default one) and serves it on `/metrics`: the
gateway and the progress service beside their API, each worker on its metrics port
(`conveyor.metrics_server`). Prometheus adds `job` and `instance`; the series carry no
tenant label unless `CONVEYOR_METRICS_TENANT_LABEL` is set, so their number stays bounded by the job
types, priorities and routes, however many tenants there are.

Only counters, histograms and gauges that are set in memory are touched on the hot paths; the gauges
that need a query (consumer lag, the outbox) are read by a periodic task (`conveyor.backlog`), never
per job or per scrape.

Where each is measured:
- `jobs_submitted`, `jobs_finished`, `job_end_to_end`: the committer, once the change is committed
  (`conveyor.jobmetrics`): counted once, by the process that wrote it.
- `jobs_rejected`, `http_*`: the HTTP middleware (`conveyor.httpmetrics`).
- `job_queue_wait`, `job_run`, `worker_slots`: the worker.
- `consumer_lag`, `outbox_*`: the gateway's periodic reading (`conveyor.backlog`).
- `websocket_connections`, `event_delivery`: the progress service.

The progress service may run several processes on one port (`CONVEYOR_PROGRESS_PROCESSES`), and a
scrape reaches one of them. Those use prometheus-client's multiprocess mode: each process writes its
series to a file of its own in the folder named by PROMETHEUS_MULTIPROC_DIR (set by their parent,
which clears a dead process's live gauges), and `/metrics` answers with the sum over them all
(`exposed_registry`). A gauge says there how its processes' values add up (`multiprocess_mode`); the
mode means nothing to a process on its own. Process-level series (`process_*`, `python_gc_*`) are
not exported then: one process's figures would pass for the service's.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Final, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

# Jobs run from a few milliseconds (noop jobs) to hours, and may wait as long.
JOB_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
# An API request takes milliseconds; `?wait=` holds one up to a minute, an SSE stream longer.
HTTP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# From a worker's event to a client's socket: milliseconds, unless Kafka or the client lags.
DELIVERY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TENANT_LABEL = "tenant"
# Labelled series remembered per process at most (then forgotten and looked up again): bounded by the
# job types and priorities, or by the tenants with the tenant label.
MAX_REMEMBERED_CHILDREN = 10_000

Series = TypeVar("Series", bound=MetricWrapperBase)
# A gauge read from elsewhere (Kafka, the database) by one process: in multiprocess mode the latest
# reading, with no `pid` label.
READING: Final = "mostrecent"

# --- the series whose labels never change ---------------------------------------------------------------

JOBS_REJECTED = Counter(
    "conveyor_jobs_rejected",
    "Submissions (POST /v1/jobs, a batch counts once) the gateway refused, by why.",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "conveyor_http_requests", "HTTP requests answered, by route template and status.", ["route", "status"]
)
HTTP_REQUEST_SECONDS = Histogram(
    "conveyor_http_request_seconds",
    "From a request's arrival to the end of its response, by route template.",
    ["route"],
    buckets=HTTP_SECONDS_BUCKETS,
)
WORKER_SLOTS_NAME = "conveyor_worker_slots"  # a collector of the worker's (services/worker/slots.py)
CONSUMER_LAG = Gauge(
    "conveyor_consumer_lag_messages",
    "Job messages the workers' group has not committed yet (end offset minus committed), by priority;"
    " read from Kafka every few seconds.",
    ["priority"],
    multiprocess_mode=READING,
)
OUTBOX_ROWS = Gauge(
    "conveyor_outbox_rows",
    "Messages in the outbox, not yet on Kafka (read every few seconds).",
    multiprocess_mode=READING,
)
OUTBOX_OLDEST_AGE = Gauge(
    "conveyor_outbox_oldest_age_seconds",
    "Age of the oldest message in the outbox; 0 when it is empty.",
    multiprocess_mode=READING,
)
# Each process's open sockets, summed over the processes alive.
WEBSOCKET_CONNECTIONS = Gauge(
    "conveyor_websocket_connections",
    "WebSockets open on this progress service.",
    multiprocess_mode="livesum",
)
EVENT_DELIVERY_SECONDS = Histogram(
    "conveyor_event_delivery_seconds",
    "From a job event's time (the worker's or gateway's clock) to its write to a client's socket.",
    buckets=DELIVERY_SECONDS_BUCKETS,
)


# --- observations counted apart, for the series observed on a hot path ---------------------------------

# How often a process adds what it tallied to its histograms (the progress app's `metrics-tallies` task).
TALLY_FLUSH_S = 1.0


class HistogramTally:
    """A histogram's observations counted in plain ints, then added to it in one go (`flush`).

    `Histogram.observe` takes a lock for each value (and writes a file in multiprocess mode): 0.7 to
    2 µs on the development VM, beside ~12 µs for the progress service's write of an event to a socket,
    done 20,000 times a second at 10,000 subscribers. Here an observation is a bisect and two
    additions (~0.15 µs). The histogram shows it after the next flush: every `TALLY_FLUSH_S`, and
    before `/metrics` answers. For a histogram without labels (or one child of a labelled one).
    """

    def __init__(self, histogram: Histogram) -> None:
        # The histogram's own bounds and values: prometheus-client has no public call that adds many
        # observations at once. tests/test_metrics.py checks that a flush exports what `observe` would.
        self._histogram = histogram
        self._bounds: list[float] = list(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`value`, observed `count` times (the same latency for the sockets of one fan-out)."""
        # The first bucket whose bound is >= value, as `Histogram.observe` picks; the last bound is +Inf.
        self._counts[bisect.bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def flush(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        if not any(counts):
            return
        self._histogram._sum.inc(total)
        for bucket, count in zip(self._histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


def flush_tallies() -> None:
    for tally in TALLIES:
        tally.flush()


# What the progress service observes of every event it writes to a socket.
EVENT_DELIVERY_TALLY = HistogramTally(EVENT_DELIVERY_SECONDS)
# Those `flush_tallies` flushes.
TALLIES = (EVENT_DELIVERY_TALLY,)


# --- the job series, which may carry the tenant -------------------------------------------------------------


@dataclass(frozen=True)
class JobSeries:
    """The series about jobs. Built once per process by `configure`: their label names depend on
    `CONVEYOR_METRICS_TENANT_LABEL`, and Prometheus fixes a series' labels when it is made."""

    tenant_label: bool
    submitted: Counter
    finished: Counter
    queue_wait: Histogram
    run: Histogram
    end_to_end: Histogram
    # The labelled children already made: `.labels()` takes a lock and builds its key on every call,
    # which is most of the cost of counting a job.
    _children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = field(default_factory=dict)

    @classmethod
    def build(cls, tenant_label: bool, registry: CollectorRegistry = REGISTRY) -> JobSeries:
        tenant = [TENANT_LABEL] if tenant_label else []
        return cls(
            tenant_label=tenant_label,
            submitted=Counter(
                "conveyor_jobs_submitted",
                "Jobs created (not an idempotent replay), by type and priority.",
                ["type", "priority", *tenant],
                registry=registry,
            ),
            finished=Counter(
                "conveyor_jobs_finished",
                "Jobs that reached a final state, by type and outcome (succeeded, failed, canceled).",
                ["type", "outcome", *tenant],
                registry=registry,
            ),
            queue_wait=Histogram(
                "conveyor_job_queue_wait_seconds",
                "From a job message's publication to the claim of its job, by priority.",
                ["priority", *tenant],
                buckets=JOB_SECONDS_BUCKETS,
                registry=registry,
            ),
            run=Histogram(
                "conveyor_job_run_seconds",
                "How long an attempt's handler ran, by job type.",
                ["type", *tenant],
                buckets=JOB_SECONDS_BUCKETS,
                registry=registry,
            ),
            end_to_end=Histogram(
                "conveyor_job_end_to_end_seconds",
                "From a job's creation to its final state (a scheduled job's delay included).",
                tenant,
                buckets=JOB_SECONDS_BUCKETS,
                registry=registry,
            ),
        )

    def unregister(self, registry: CollectorRegistry = REGISTRY) -> None:
        for series in (self.submitted, self.finished, self.queue_wait, self.run, self.end_to_end):
            registry.unregister(series)

    def labelled(self, series: Series, *labels: str) -> Series:
        """`series.labels(*labels)`, remembered."""
        key = (id(series), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= MAX_REMEMBERED_CHILDREN:
                self._children.clear()
            child = self._children[key] = series.labels(*labels)
        return child  # type: ignore[return-value]

    def tenant(self, tenant: str) -> tuple[str, ...]:
        """The tenant label's value, if the series have one: appended to a series' other labels."""
        return (tenant,) if self.tenant_label else ()

    def observe_end_to_end(self, tenant: str, seconds: float) -> None:
        # Without the tenant it has no labels at all, and prometheus-client refuses `.labels()` then.
        series = self.labelled(self.end_to_end, tenant) if self.tenant_label else self.end_to_end
        series.observe(seconds)


_jobs: list[JobSeries] = []


def configure(tenant_label: bool) -> JobSeries:
    """Make the job series with or without the tenant label (once per process; again only if the
    choice changed, as tests in one process may)."""
    if _jobs and _jobs[0].tenant_label == tenant_label:
        return _jobs[0]
    if _jobs:
        _jobs.pop().unregister()
    _jobs.append(JobSeries.build(tenant_label))
    return _jobs[0]


def jobs() -> JobSeries:
    """The job series of this process (without the tenant label, unless `configure` said otherwise)."""
    return _jobs[0] if _jobs else configure(tenant_label=False)


# Where the processes of a multiprocess service write their series (prometheus-client's own variable).
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_exposed: list[CollectorRegistry] = []


def exposed_registry() -> CollectorRegistry:
    """What `/metrics` exports: this process's registry; in multiprocess mode, a registry that sums
    the series of every process of the service."""
    if not os.environ.get(MULTIPROCESS_DIR_ENV):
        return REGISTRY
    if not _exposed:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        _exposed.append(registry)
    return _exposed[0]
