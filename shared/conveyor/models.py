"""SQLAlchemy models: jobs, their event history, API keys, and the outbox of messages waiting for Kafka."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Enum,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect, Row
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Re-exported: the modules that stamp rows know the process's clock from here.
from conveyor.clock import utcnow as utcnow
from conveyor.lifecycle import JobState


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone, so we store naive UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)

    # On SQLite a time is text in SQLAlchemy's format (`2026-12-01 09:00:00.123456`), which its own
    # processors write with `strftime` and read with a regular expression; the same text comes and goes
    # several times faster through `isoformat` and `fromisoformat`. Every job row read has six of them.

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)

        return process


def _state_values(states: type[JobState]) -> list[str]:
    return [state.value for state in states]


# A job's status, read as a `JobState` and stored as its value (`queued`, ...): the VARCHAR(16) the
# column always was (no native enum type, no CHECK constraint), so existing rows and the migrations
# stay as they are, on SQLite and PostgreSQL alike.
JOB_STATE = Enum(
    JobState,
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=_state_values,
)

SCHEDULED = text("status = 'scheduled'")
RUNNING = text("status = 'running'")
HAS_FINISHED = text("finished_at IS NOT NULL")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobState] = mapped_column(JOB_STATE)
    priority: Mapped[int] = mapped_column(Integer)
    payload: Mapped[Any] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    progress_percent: Mapped[float | None] = mapped_column(nullable=True)
    progress_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    # The caller's own small string map; `job_labels` holds a copy per pair so lists can filter on them.
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    # A scheduled job waits until then; None for a job submitted to run at once.
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Each attempt is stopped after this long and counts as failed; None means the type's or no limit.
    timeout_s: Mapped[float | None] = mapped_column(nullable=True)
    # The sequence number of the job's latest event: events are numbered 1, 2, 3... per job.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # A running attempt holds the job until this time; its worker's heartbeat pushes it forward.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Attempts draining workers handed back unfinished: the first few are free (`changes.hand_back`).
    hand_backs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The submission's trace context (`conveyor.tracing`: a carrier, JSON), when tracing is on: the
    # messages of changes that no traced caller made (the scheduler, the reaper) continue its trace.
    trace_context: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
        # Partial: only the rows the scheduler and the reaper look for (migration 0004 says why).
        Index("ix_jobs_scheduled_run_at", "run_at", sqlite_where=SCHEDULED, postgresql_where=SCHEDULED),
        Index("ix_jobs_running_lease", "lease_expires_at", sqlite_where=RUNNING, postgresql_where=RUNNING),
        # Partial: retention's oldest finished jobs (migration 0005).
        Index("ix_jobs_finished_at", "finished_at", sqlite_where=HAS_FINISHED, postgresql_where=HAS_FINISHED),
    )


JOBS: Table = Job.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's row as read or written by Core SQL: what the hot paths pass around instead of an ORM
    object, which costs an identity map, instrumentation and a flush to make."""

    id: str
    tenant: str
    type: str
    status: JobState
    priority: int
    payload: Any
    result: Any | None
    error: dict[str, Any] | None
    progress_percent: float | None
    progress_message: str | None
    attempts: int
    max_attempts: int
    labels: dict[str, str]
    run_at: datetime | None
    timeout_s: float | None
    last_seq: int
    worker_id: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    hand_backs: int = 0
    trace_context: str | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> JobRecord:
        """A row of `select(*JOB_COLUMNS)` (or a RETURNING of them): its columns are in this order."""
        return cls(*row)  # type: ignore[call-arg]


# Every column of `jobs`, in JobRecord's order: `select(*JOB_COLUMNS)` reads rows `from_row` takes.
JOB_COLUMNS: tuple[Column[Any], ...] = tuple(JOBS.c[name] for name in JobRecord.__slots__)


# What the functions that read a job's fields take: the ORM object or the Core record.
JobView = Job | JobRecord


class JobLabel(Base):
    """One `key=value` label of a job, so `GET /v1/jobs?label=k=v` is an indexed lookup on any database."""

    __tablename__ = "job_labels"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index("ix_job_labels_key_value", "key", "value"),)


class IdempotencyKey(Base):
    """A tenant's `Idempotency-Key`, the fingerprint of the request that first used it, and its job.

    The primary key makes the database itself refuse a second job for the same key, also when two
    identical requests race; the loser reads the winner's row and answers with the same job.
    """

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the request body in canonical JSON: the same key with another body is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class JobEventRecord(Base):
    """One event of a job's history, written with the change it announces: resumes replay from here."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The event as published on Kafka (a `JobEvent` as JSON), so a replay sends exactly what went live.
    body: Mapped[str] = mapped_column(Text)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200), default="")
    # SHA-256 of the key: keys are long random tokens, so a fast hash is enough and lookups stay indexed.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OutboxMessage(Base):
    """A Kafka message written in the same transaction as the state it announces (transactional outbox)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(249))
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[bytes] = mapped_column(LargeBinary)
    # Set only where the key's partition will not do: a reaped job goes to a partition of its reaper's.
    partition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The trace context of the span that staged the message (`conveyor.tracing`: a carrier, JSON), which
    # the relay's publish span continues and sends on in the message's headers; None when not tracing.
    headers: Mapped[str | None] = mapped_column(Text, nullable=True)


class WorkerHeartbeat(Base):
    """A live worker's heartbeat, by the database's clock. A worker whose heartbeat stopped is dead, and
    the reaper gives its running jobs their next attempt at once rather than when their leases run out."""

    __tablename__ = "worker_heartbeats"

    worker_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)


WORKER_HEARTBEATS: Table = WorkerHeartbeat.__table__  # type: ignore[assignment]


class JobMessagePosition(Base):
    """Where a job's latest job message landed on Kafka, as the broker acknowledged it: what the workers'
    sweep for lost messages compares with the group's offsets (`services/worker/strays.py`).

    A table of its own, written only by the outbox relays: on the `jobs` row, the relay's update would
    wait on the row locks of the very claims its message has just caused (migration 0006)."""

    __tablename__ = "job_message_positions"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(BigInteger)


JOB_MESSAGE_POSITIONS: Table = JobMessagePosition.__table__  # type: ignore[assignment]
