"""Reads of jobs, and the lease writes that are not state changes, each a small named function over a
sync `Connection` (run it with `Database.read` or `Database.write`).

Every state change of a job goes through `conveyor.changes` instead: there, and only there, a change
bumps the job's `last_seq` and records and stages its event. Renewing a lease is not such a change:
clients hear nothing of it, so it lives here.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session

from conveyor.changes import LEASE_EXPIRED, attempt_abandoned
from conveyor.clock import database_now
from conveyor.lifecycle import TERMINAL_STATES, WAITING_STATES, JobState
from conveyor.models import JOB_COLUMNS, JOBS, RUNNING, SCHEDULED, WORKER_HEARTBEATS, JobLabel, JobRecord

# A `Connection`, or an ORM `Session` (as `AsyncSession.run_sync` hands one): both run Core queries.
Reader = Connection | Session
LABELS = JobLabel.__table__


# Ids in one `IN (...)` list: well under SQLite's and PostgreSQL's limits on bound parameters.
MAX_IDS_PER_QUERY = 500


def is_job_id(text: str) -> bool:
    """Whether `text` could be a job id (a UUID in its usual form). Anything else names no job, and
    is never sent to the database: PostgreSQL refuses some strings (a NUL byte) outright."""
    if len(text) != 36:
        return False
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


def _jobs(connection: Reader, query: object) -> list[JobRecord]:
    return [JobRecord.from_row(row) for row in connection.execute(query)]  # type: ignore[call-overload]


def get_job(connection: Reader, tenant: str, job_id: str) -> JobRecord | None:
    """The tenant's job, or None: another tenant's job is indistinguishable from a missing one."""
    if not is_job_id(job_id):
        return None
    jobs = _jobs(connection, select(*JOB_COLUMNS).where(JOBS.c.id == job_id, JOBS.c.tenant == tenant))
    return jobs[0] if jobs else None


def load_job(connection: Reader, job_id: str) -> JobRecord | None:
    """A job by id alone, for services that act on messages rather than on a tenant's request."""
    jobs = _jobs(connection, select(*JOB_COLUMNS).where(JOBS.c.id == job_id))
    return jobs[0] if jobs else None


def tenants_jobs(connection: Reader, keys: Collection[tuple[str, str]]) -> dict[tuple[str, str], JobRecord]:
    """Many jobs in one query, by (tenant, job id): those that exist and are that tenant's."""
    ids = sorted({job_id for _, job_id in keys if is_job_id(job_id)})
    found: dict[tuple[str, str], JobRecord] = {}
    for start in range(0, len(ids), MAX_IDS_PER_QUERY):
        chunk = ids[start : start + MAX_IDS_PER_QUERY]
        for job in _jobs(connection, select(*JOB_COLUMNS).where(JOBS.c.id.in_(chunk))):
            found[(job.tenant, job.id)] = job
    return {key: found[key] for key in keys if key in found}


def active_jobs(connection: Reader, tenant: str, limit: int) -> list[JobRecord]:
    """The tenant's jobs that are not finished yet, newest first."""
    query = (
        select(*JOB_COLUMNS)
        .where(JOBS.c.tenant == tenant, JOBS.c.status.not_in(sorted(TERMINAL_STATES)))
        .order_by(JOBS.c.created_at.desc())
        .limit(limit)
    )
    return _jobs(connection, query)


def count_waiting_jobs(connection: Reader, tenant: str) -> int:
    """How many of the tenant's jobs wait to run (scheduled or queued): what its queue limit counts."""
    query = select(func.count()).where(JOBS.c.tenant == tenant, JOBS.c.status.in_(sorted(WAITING_STATES)))
    return int(connection.execute(query).scalar() or 0)


@dataclass(frozen=True)
class JobFilter:
    """What `list_jobs` selects; an empty collection or None means "any"."""

    statuses: Collection[JobState] = ()
    types: Collection[str] = ()
    priorities: Collection[int] = ()
    labels: dict[str, str] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None


def list_jobs(
    connection: Reader,
    tenant: str,
    where: JobFilter,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[JobRecord]:
    """The tenant's jobs matching `where`, newest first (ties broken by id), starting after the
    `(created_at, id)` position `before` of a previous page: keyset pagination, stable under inserts."""
    query = select(*JOB_COLUMNS).where(JOBS.c.tenant == tenant)
    if where.statuses:
        query = query.where(JOBS.c.status.in_(sorted(where.statuses)))
    if where.types:
        query = query.where(JOBS.c.type.in_(sorted(where.types)))
    if where.priorities:
        query = query.where(JOBS.c.priority.in_(sorted(where.priorities)))
    for key, value in sorted(where.labels.items()):
        query = query.where(
            exists().where(LABELS.c.job_id == JOBS.c.id, LABELS.c.key == key, LABELS.c.value == value)
        )
    if where.created_after is not None:
        query = query.where(JOBS.c.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(JOBS.c.created_at < where.created_before)
    if before is not None:
        created_at, job_id = before
        query = query.where(
            or_(JOBS.c.created_at < created_at, and_(JOBS.c.created_at == created_at, JOBS.c.id < job_id))
        )
    query = query.order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc()).limit(limit)
    return _jobs(connection, query)


def canceled_jobs(connection: Reader, job_ids: Collection[str]) -> set[str]:
    """Of these jobs, the ones canceled: a worker asks this of the jobs it runs, often."""
    if not job_ids:
        return set()
    query = select(JOBS.c.id).where(JOBS.c.id.in_(sorted(job_ids)), JOBS.c.status == JobState.CANCELED)
    return set(connection.execute(query).scalars().all())


def due_jobs(connection: Connection, limit: int) -> list[JobRecord]:
    """Scheduled jobs whose `run_at` has come by the database's clock, the earliest first."""
    query = (
        select(*JOB_COLUMNS)
        # The partial index's own condition, as text: it is certain to match it, whatever the driver.
        .where(SCHEDULED, JOBS.c.run_at <= database_now(connection))
        .order_by(JOBS.c.run_at)
        .limit(limit)
    )
    return _jobs(connection, query)


def abandoned_jobs(connection: Connection, limit: int, dead_after_s: float) -> list[JobRecord]:
    """Running jobs whose attempt nobody runs any more: its worker's heartbeat is older than
    `dead_after_s`, or (for a worker that keeps none) its lease ran out. By the database's clock."""
    now = database_now(connection)
    query = (
        select(*JOB_COLUMNS)
        .where(RUNNING, attempt_abandoned(now, now - timedelta(seconds=dead_after_s)))
        .order_by(JOBS.c.lease_expires_at)
        .limit(limit)
    )
    return _jobs(connection, query)


def renew_leases(
    connection: Connection, worker_id: str, attempts: dict[str, int], lease_s: float
) -> set[str]:
    """Push forward the leases of this worker's running attempts; returns the job ids it still holds."""
    if not attempts:
        return set()
    held_by_attempt = or_(
        *(and_(JOBS.c.id == job_id, JOBS.c.attempts == attempt) for job_id, attempt in attempts.items())
    )
    rows = connection.execute(
        update(JOBS)
        .where(held_by_attempt, JOBS.c.status == JobState.RUNNING, JOBS.c.worker_id == worker_id)
        .values(lease_expires_at=database_now(connection) + timedelta(seconds=lease_s))
        .returning(JOBS.c.id)
    )
    return set(rows.scalars().all())


def beat(connection: Connection, worker_id: str) -> None:
    """Record that this worker is alive, now by the database's clock (its row made on the first beat)."""
    now = database_now(connection)
    written = connection.execute(
        update(WORKER_HEARTBEATS).where(WORKER_HEARTBEATS.c.worker_id == worker_id).values(heartbeat_at=now)
    )
    if written.rowcount == 0:
        connection.execute(
            WORKER_HEARTBEATS.insert().values(worker_id=worker_id, started_at=now, heartbeat_at=now)
        )


def forget_worker(connection: Connection, worker_id: str) -> None:
    """A worker that stops cleanly takes its heartbeat away: what it still held was handed back."""
    connection.execute(WORKER_HEARTBEATS.delete().where(WORKER_HEARTBEATS.c.worker_id == worker_id))


def forget_dead_workers(connection: Connection, older_than_s: float) -> int:
    """Delete the heartbeats of workers dead this long: their jobs were reaped long before."""
    cutoff = database_now(connection) - timedelta(seconds=older_than_s)
    deleted = connection.execute(WORKER_HEARTBEATS.delete().where(WORKER_HEARTBEATS.c.heartbeat_at < cutoff))
    return int(deleted.rowcount or 0)


def lost_attempts(connection: Reader, worker_id: str, attempts: dict[str, int]) -> set[str]:
    """Of these attempts, the ones whose job was taken from them: by another attempt or worker, by a
    cancel, or by the reaper (which records LEASE_EXPIRED). An attempt that recorded its own outcome
    meanwhile (succeeded, failed, or queued again for a retry) has lost nothing."""
    if not attempts:
        return set()
    jobs = _jobs(connection, select(*JOB_COLUMNS).where(JOBS.c.id.in_(sorted(attempts))))
    return {
        job.id
        for job in jobs
        if job.attempts != attempts[job.id]
        or job.worker_id != worker_id
        or job.status == JobState.CANCELED
        or (job.error or {}).get("type") == LEASE_EXPIRED
    }
