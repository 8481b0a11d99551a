"""The one settings class. Every value can be set by an environment variable prefixed `CONVEYOR_`."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from conveyor.cpus import usable_cpus

DEFAULT_GATEWAY_PORT = 8000
DEFAULT_PROGRESS_PORT = 8001
DEFAULT_KAFKA_PORT = 19092
DEFAULT_KAFKA_VERSION = "4.1.1"
# Partitions per topic. One tenant's jobs spread over every partition of their priority topic, and a
# worker owns whole partitions, so N workers share a tenant's load evenly when N divides this: 12 is
# even for 1, 2, 3, 4, 6 and 12 workers.
DEFAULT_PARTITIONS = 12
# Partitions of the events and dead-letter topics. Each progress service reads every partition of the
# events topic, so it needs no more for parallelism, and every partition a batch of events is spread
# over costs the broker (measured: 12 rather than 3 cost about a tenth of the accept rate).
DEFAULT_EVENTS_PARTITIONS = 3
DEFAULT_WORKER_CONCURRENCY = 8
# Job messages a worker reads ahead per partition, for its slots to choose among by priority and tenant.
DEFAULT_WORKER_READ_AHEAD = 1000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_LEASE_S = 15.0
# A worker whose heartbeat (about one a second) is this old is dead: its running jobs start again at once.
DEFAULT_WORKER_DEAD_AFTER_S = 4.0
# A job queued this long whose Kafka message was consumed without a claim, or deleted, is published again.
DEFAULT_STRAY_GRACE_S = 60.0
DEFAULT_DRAIN_GRACE_S = 30.0
# `conveyor run` scales its worker processes between these on the workers' consumer lag
# (`conveyor.autoscaling`); how long the workers must have had little to do before one is drained.
DEFAULT_WORKERS_MIN = 1
DEFAULT_WORKERS_MAX = 4
DEFAULT_WORKERS_IDLE_S = 60.0
# The progress service: events a client may have waiting before it is told to resume; protocol-level
# WebSocket pings; how long a socket may sit with no subscription and no message; how long a
# finished job's event history is kept for resumes.
DEFAULT_PROGRESS_CLIENT_QUEUE = 1000
DEFAULT_PROGRESS_PING_INTERVAL_S = 20.0
DEFAULT_PROGRESS_PING_TIMEOUT_S = 20.0
DEFAULT_PROGRESS_IDLE_TIMEOUT_S = 60.0
DEFAULT_EVENT_HISTORY_S = 7 * 24 * 3600.0
# What one client may cost the progress service: the largest WebSocket frame it may send (a subscribe
# of 100 ids is under 5 KiB), how long a socket may take to present its key, messages per second per
# socket with bursts, and sockets and SSE streams per tenant on one instance (the fan-out benchmark's
# 2,000 subscribers of one tenant fit).
DEFAULT_PROGRESS_WS_MAX_BYTES = 64 * 1024
DEFAULT_PROGRESS_AUTH_TIMEOUT_S = 10.0
DEFAULT_PROGRESS_MESSAGE_RATE = 20.0
DEFAULT_PROGRESS_MESSAGE_BURST = 50
DEFAULT_PROGRESS_TENANT_MAX_SOCKETS = 5000
DEFAULT_PROGRESS_TENANT_MAX_STREAMS = 1000
# The progress service's processes, all on its one port (SO_REUSEPORT), each a whole instance (its own
# reader of the events topic, database pool and per-tenant caps): 0 is one per CPU the service may use
# (`conveyor.cpus`), at most MAX_AUTO_PROGRESS_PROCESSES. Delivering events is CPU work in one thread,
# so one process uses one core; each more costs its memory (~100 MiB idle), a database pool and a
# reader of every event, which past a few cores more instances (pods) spread better.
DEFAULT_PROGRESS_PROCESSES = 0
MAX_AUTO_PROGRESS_PROCESSES = 4
MAX_PROGRESS_PROCESSES = 64
# How long a finished job is kept (with its events, labels and idempotency key) before it is deleted.
DEFAULT_JOB_RETENTION_S = 7 * 24 * 3600.0
# The JSON of one page of a listing (the jobs, a job's event history) at most; past it the page ends
# early and says where the rest begins (`conveyor.pages`).
DEFAULT_MAX_PAGE_BYTES = 4 * 1024 * 1024
# What the gateway suggests a client waits before its first poll of a fresh job.
DEFAULT_RETRY_AFTER_S = 1
# How long an `Idempotency-Key` is remembered (the window the API publishes).
DEFAULT_IDEMPOTENCY_WINDOW_S = 24 * 3600.0
# Per-tenant limits: jobs waiting to run (scheduled or queued), and submissions per second with a burst.
DEFAULT_TENANT_MAX_QUEUED = 10_000
DEFAULT_TENANT_SUBMIT_RATE = 100.0
# A burst as large as the largest batch (`POST /v1/jobs/batch`), so a default tenant can send one.
DEFAULT_TENANT_SUBMIT_BURST = 1000
# Requests one tenant may have waiting at once on a gateway (`GET /v1/jobs/<id>?wait=`).
DEFAULT_TENANT_MAX_WAITING = 100
# How long a canceled job's handler may take to notice `ctx.cancelled` before its task is cancelled.
DEFAULT_CANCEL_GRACE_S = 10.0
# Retries wait a random time ("full jitter") up to min(cap, base * 2 ** (attempt - 1)).
DEFAULT_RETRY_BASE_S = 1.0
DEFAULT_RETRY_CAP_S = 300.0
# How workers share their capacity between the priority levels 1..5 when every level has a backlog.
DEFAULT_PRIORITY_WEIGHTS = (16, 8, 4, 2, 1)
# Kafka's own default: a consumer that does not poll for this long is pushed out of its group. The
# worker polls while its jobs run, so even jobs far longer than this keep their partitions.
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
# The largest payload a job may carry and the largest result a handler may return, encoded as JSON.
# A dead letter carries the payload and a `succeeded` event the result, so Kafka's message limits
# (the producer's and the topics') are set from these with room for the rest of the message
# (`conveyor.sizes`). Half a MiB each keeps every message under Kafka's own 1 MiB default.
DEFAULT_MAX_PAYLOAD_BYTES = 512 * 1024
DEFAULT_MAX_RESULT_BYTES = 512 * 1024
# Each worker serves /metrics and /healthz on this port; under `conveyor run` worker n takes this plus
# n - 1 (8002, 8003, ...), beside the gateway's 8000 and the progress service's 8001. 0 turns it off.
DEFAULT_WORKER_METRICS_PORT = 8002
# `conveyor run` itself (its autoscaler's gauge) serves /metrics and /healthz here: clear of the
# workers' ports however many there are.
DEFAULT_RUN_METRICS_PORT = 8090
# The metrics token is a secret like an API key, and as long at least.
MIN_METRICS_TOKEN_LENGTH = 24


# Tenants whose limits one process remembers at most (then it starts again).
LIMITS_CACHE_SIZE = 10_000


class TenantLimits(BaseModel):
    """One tenant's limits; `CONVEYOR_TENANT_LIMITS` overrides the defaults per tenant."""

    max_queued: int = Field(default=DEFAULT_TENANT_MAX_QUEUED, ge=1)
    submit_rate: float = Field(default=DEFAULT_TENANT_SUBMIT_RATE, gt=0)
    submit_burst: int = Field(default=DEFAULT_TENANT_SUBMIT_BURST, ge=1)
    # Within a priority level, workers give tenants with jobs waiting turns of this many slots each.
    weight: int = Field(default=1, ge=1, le=1000)


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value may be a secret (a token, a database URL with its password).
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(default=Path("data"), description="Where the embedded stack keeps its state.")
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "conveyor",
        description="Where downloaded broker jars are cached across runs.",
    )

    # Kafka. Empty bootstrap means "start the embedded broker" for `conveyor run`; services need it set.
    kafka_bootstrap: str = Field(default="", description="Kafka bootstrap servers, host:port[,host:port].")
    kafka_version: str = DEFAULT_KAFKA_VERSION
    kafka_port: int = DEFAULT_KAFKA_PORT
    topic_prefix: str = Field(default="conveyor", description="Prefix of every topic the project uses.")
    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1, description="Partitions of each job topic.")
    events_partitions: int = Field(
        default=DEFAULT_EVENTS_PARTITIONS,
        ge=1,
        description="Partitions of the events and dead-letter topics.",
    )
    replication_factor: int = Field(default=1, ge=1)

    # Database. Empty means SQLite in the data folder.
    database_url: str = ""

    # HTTP.
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    progress_port: int = DEFAULT_PROGRESS_PORT
    public_url: str = Field(default="", description="Base URL clients use for the gateway (links).")
    progress_public_url: str = Field(default="", description="Base URL clients use for the progress service.")

    # Auth: bootstrap keys, `tenant:key,tenant:key`. Keys stored in the database work as well.
    api_keys: str = ""

    # Gateway.
    idempotency_window_s: float = Field(
        default=DEFAULT_IDEMPOTENCY_WINDOW_S, gt=0, description="How long an Idempotency-Key is kept."
    )
    job_retention_s: float = Field(
        default=DEFAULT_JOB_RETENTION_S,
        gt=0,
        description="How long a finished job is kept, with its events, labels and key, before it is deleted.",
    )
    tenant_max_queued: int = Field(
        default=DEFAULT_TENANT_MAX_QUEUED, ge=1, description="Jobs a tenant may have waiting to run."
    )
    tenant_submit_rate: float = Field(
        default=DEFAULT_TENANT_SUBMIT_RATE, gt=0, description="Submissions per second per tenant."
    )
    tenant_submit_burst: int = Field(
        default=DEFAULT_TENANT_SUBMIT_BURST, ge=1, description="Submissions a tenant may make at once."
    )
    max_page_bytes: int = Field(
        default=DEFAULT_MAX_PAGE_BYTES,
        ge=1024,
        description="Bytes of items one page of the job list or of an event history holds at most.",
    )
    tenant_max_waiting: int = Field(
        default=DEFAULT_TENANT_MAX_WAITING,
        ge=1,
        description="Requests a tenant may have waiting at once (`?wait=`) on each gateway.",
    )
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024, description="Largest payload a job may carry, as JSON."
    )
    tenant_limits: dict[str, TenantLimits] = Field(
        default_factory=dict,
        description='Per-tenant overrides as JSON: {"acme": {"max_queued": 100, "submit_rate": 5}}.',
    )

    # Workers.
    handlers: str = Field(default="conveyor.demo", description="Comma-separated handler modules to import.")
    worker_concurrency: int = Field(default=DEFAULT_WORKER_CONCURRENCY, ge=1)
    worker_read_ahead: int = Field(
        default=DEFAULT_WORKER_READ_AHEAD,
        ge=1,
        description="Job messages a worker reads ahead per partition, to choose by priority and tenant.",
    )
    worker_processes: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Size of a worker's pool for `@job(..., process=True)` handlers; default one per CPU.",
    )
    default_max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)
    lease_s: float = Field(
        default=DEFAULT_LEASE_S, gt=0, description="How long a running job survives its worker's silence."
    )
    worker_dead_after_s: float = Field(
        default=DEFAULT_WORKER_DEAD_AFTER_S,
        gt=0,
        description="A worker whose heartbeat is this old is dead; its running jobs get their next attempt.",
    )
    stray_grace_s: float = Field(
        default=DEFAULT_STRAY_GRACE_S,
        gt=0,
        description="A job queued this long whose Kafka message is lost (consumed unclaimed, or deleted)"
        " is published again.",
    )
    cancel_grace_s: float = Field(
        default=DEFAULT_CANCEL_GRACE_S,
        ge=0,
        description="How long a canceled job's handler may ignore ctx.cancelled before it is interrupted.",
    )
    drain_grace_s: float = Field(
        default=DEFAULT_DRAIN_GRACE_S, ge=0, description="How long SIGTERM lets in-flight jobs finish."
    )
    retry_base_s: float = Field(
        default=DEFAULT_RETRY_BASE_S,
        ge=0,
        description="Backoff base of a failed attempt's retry, unless its job type sets its own.",
    )
    retry_cap_s: float = Field(
        default=DEFAULT_RETRY_CAP_S,
        ge=0,
        description="Longest backoff before a retry, unless its job type sets its own.",
    )
    priority_weights: Annotated[tuple[int, int, int, int, int], NoDecode] = Field(
        default=DEFAULT_PRIORITY_WEIGHTS,
        description="Shares of a worker's capacity for priorities 1..5 when all are backlogged: 16,8,4,2,1.",
    )
    max_result_bytes: int = Field(
        default=DEFAULT_MAX_RESULT_BYTES, ge=1024, description="Largest result a handler may return, as JSON."
    )
    expose_tracebacks: bool = Field(
        default=False,
        description="Put a failed attempt's traceback in the job's `error` (development only: it is always"
        " in the worker's log).",
    )
    kafka_max_poll_interval_ms: int = Field(
        default=DEFAULT_MAX_POLL_INTERVAL_MS,
        ge=1000,
        description="Kafka's max.poll.interval.ms for the workers' consumers.",
    )

    # Progress service.
    progress_client_queue: int = Field(
        default=DEFAULT_PROGRESS_CLIENT_QUEUE,
        ge=1,
        description="Events one client may have waiting; past it the client is closed with 4008 to resume.",
    )
    progress_ping_interval_s: float = Field(
        default=DEFAULT_PROGRESS_PING_INTERVAL_S, gt=0, description="WebSocket ping interval."
    )
    progress_ping_timeout_s: float = Field(
        default=DEFAULT_PROGRESS_PING_TIMEOUT_S,
        gt=0,
        description="A socket whose pong is this late is closed.",
    )
    progress_idle_timeout_s: float = Field(
        default=DEFAULT_PROGRESS_IDLE_TIMEOUT_S,
        gt=0,
        description="A socket with no subscription that sends nothing for this long is closed.",
    )
    progress_ws_deflate: bool = Field(
        default=False,
        description="Offer permessage-deflate on WebSockets: fewer bytes, but about 80 rather than 45 KiB"
        " and more CPU per socket (bench/progress_fanout.py); events are small.",
    )
    progress_ws_max_bytes: int = Field(
        default=DEFAULT_PROGRESS_WS_MAX_BYTES,
        ge=1024,
        description="Largest WebSocket message a client may send; a larger one closes the socket (1009).",
    )
    progress_auth_timeout_s: float = Field(
        default=DEFAULT_PROGRESS_AUTH_TIMEOUT_S,
        gt=0,
        description="How long a socket without a key in its handshake has to send it (then 1008).",
    )
    progress_message_rate: float = Field(
        default=DEFAULT_PROGRESS_MESSAGE_RATE,
        gt=0,
        description="Messages per second a socket may send on average; past it the socket is closed (1008).",
    )
    progress_message_burst: int = Field(
        default=DEFAULT_PROGRESS_MESSAGE_BURST, ge=1, description="Messages a socket may send at once."
    )
    progress_tenant_max_sockets: int = Field(
        default=DEFAULT_PROGRESS_TENANT_MAX_SOCKETS,
        ge=1,
        description="WebSockets one tenant may hold open on one progress instance (then 4429).",
    )
    progress_tenant_max_streams: int = Field(
        default=DEFAULT_PROGRESS_TENANT_MAX_STREAMS,
        ge=1,
        description="SSE streams one tenant may hold open on one progress instance (then 429).",
    )
    progress_processes: int = Field(
        default=DEFAULT_PROGRESS_PROCESSES,
        ge=0,
        le=MAX_PROGRESS_PROCESSES,
        description="Processes of `conveyor progress` sharing its port (SO_REUSEPORT); 0: one per usable"
        f" CPU, at most {MAX_AUTO_PROGRESS_PROCESSES}.",
    )
    event_history_s: float = Field(
        default=DEFAULT_EVENT_HISTORY_S,
        gt=0,
        description="How long a finished job's events are kept for clients that resume.",
    )

    # Metrics (`/metrics` on every service; see conveyor.metrics).
    metrics_token: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer token that `/metrics` asks for; unset, nobody can read the metrics.",
    )
    metrics_tenant_label: bool = Field(
        default=False,
        description="Add a `tenant` label to the job series (one series per tenant: mind the cardinality).",
    )
    run_metrics_port: int = Field(
        default=DEFAULT_RUN_METRICS_PORT,
        ge=0,
        le=65535,
        description="Port of `conveyor run`'s own /metrics and /healthz (the autoscaler's gauge); 0: none.",
    )
    worker_metrics_port: int = Field(
        default=DEFAULT_WORKER_METRICS_PORT,
        ge=0,
        le=65535,
        description="Port of a worker's /metrics and /healthz (0: none); `conveyor run` gives worker n"
        " this plus n - 1.",
    )

    # Embedded stack (`conveyor run`).
    workers_min: int = Field(
        default=DEFAULT_WORKERS_MIN, ge=0, description="Fewest worker processes `conveyor run` keeps."
    )
    workers_max: int = Field(
        default=DEFAULT_WORKERS_MAX,
        ge=0,
        description="Most worker processes `conveyor run` scales to (at most a job topic's partitions).",
    )
    workers: int | None = Field(
        default=None, ge=0, description="Pins `conveyor run` to this many workers: minimum and maximum both."
    )
    workers_idle_s: float = Field(
        default=DEFAULT_WORKERS_IDLE_S,
        gt=0,
        description="How long `conveyor run`'s workers must have had little to do before one is drained.",
    )

    # For tests only: shifts this process's idea of now, as on a host whose clock is off.
    clock_skew_s: float = 0.0

    log_level: str = "INFO"
    log_json: bool = False

    _limits: dict[str, TenantLimits] = PrivateAttr(default_factory=dict)

    @field_validator("priority_weights", mode="before")
    @classmethod
    def _split_weights(cls, value: Any) -> Any:
        """Accept `16,8,4,2,1` (or `16:8:4:2:1`) from the environment, as well as a sequence."""
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(":", ",").split(",") if part.strip())
        return value

    @field_validator("priority_weights")
    @classmethod
    def _positive_weights(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(weight < 1 for weight in value):
            raise ValueError("every priority weight must be at least 1")
        return value

    @field_validator("metrics_token")
    @classmethod
    def _long_enough_token(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < MIN_METRICS_TOKEN_LENGTH:
            raise ValueError(f"the metrics token must be at least {MIN_METRICS_TOKEN_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _worker_bounds_in_order(self) -> Settings:
        if self.workers is None and self.workers_min > self.workers_max:
            raise ValueError(f"workers_min ({self.workers_min}) is above workers_max ({self.workers_max})")
        return self

    @property
    def worker_bounds(self) -> tuple[int, int]:
        """The fewest and most workers of `conveyor run`: both `workers` when it pins the count."""
        if self.workers is not None:
            return self.workers, self.workers
        return self.workers_min, self.workers_max

    @property
    def progress_process_count(self) -> int:
        """How many processes `conveyor progress` runs: the setting, or for 0 one per usable CPU."""
        if self.progress_processes:
            return self.progress_processes
        return min(usable_cpus(), MAX_AUTO_PROGRESS_PROCESSES)

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'conveyor.db').resolve()}"

    def limits_for(self, tenant: str) -> TenantLimits:
        """The tenant's limits: its overrides, and the defaults for what it does not override. Asked
        for on every submission, so worked out once per tenant."""
        limits = self._limits.get(tenant)
        if limits is None:
            if len(self._limits) >= LIMITS_CACHE_SIZE:
                self._limits.clear()
            limits = self._limits[tenant] = self._limits_of(tenant)
        return limits

    def _limits_of(self, tenant: str) -> TenantLimits:
        limits = TenantLimits(
            max_queued=self.tenant_max_queued,
            submit_rate=self.tenant_submit_rate,
            submit_burst=self.tenant_submit_burst,
        )
        override = self.tenant_limits.get(tenant)
        if override is None:
            return limits
        return limits.model_copy(update=override.model_dump(exclude_unset=True))

    @property
    def handler_modules(self) -> list[str]:
        return [name.strip() for name in self.handlers.split(",") if name.strip()]

    @property
    def gateway_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://{self.host}:{self.gateway_port}"

    @property
    def progress_url(self) -> str:
        if self.progress_public_url:
            return self.progress_public_url.rstrip("/")
        return f"ws://{self.host}:{self.progress_port}"


def load_settings() -> Settings:
    return Settings()
