"""Reads and writes of jobs, each a small named function over an `AsyncSession`.

Status changes go through `transition`: one conditional UPDATE whose WHERE clause allows only the
legal source states (from `conveyor.lifecycle`) and, for a worker, only its own attempt. Two writers
racing on a job cannot both win, and a late writer from a fenced-off attempt changes nothing.
Every write that clients should hear about bumps `last_seq`, records a `JobEvent` in the job's history
and stages it in the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.eventlog import record_event
from conveyor.events import dead_letter_for, event_for, job_message_for
from conveyor.lifecycle import TERMINAL_STATES, WAITING_STATES, JobState, sources_of
from conveyor.models import Job, JobLabel, OutboxMessage, utcnow
from conveyor.outbox import stage_message
from conveyor.topics import dead_letter_topic, events_topic, job_key, job_topic

# The error type recorded on an attempt whose worker stopped renewing its lease.
LEASE_EXPIRED = "LeaseExpired"
# The error type recorded on an attempt that ran longer than its timeout (the job's or its type's).
TIMED_OUT = "timed_out"
# The error type recorded on an attempt a draining worker gave back unfinished; it does not count.
HANDED_BACK = "handed_back"


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    """Whether `text` could be a job id (a UUID in its usual form). Anything else names no job, and
    is never sent to the database: PostgreSQL refuses some strings (a NUL byte) outright."""
    if len(text) != 36:
        return False
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


async def insert_job(
    session: AsyncSession,
    *,
    tenant: str,
    type: str,
    payload: Any,
    priority: int,
    max_attempts: int,
    labels: dict[str, str] | None = None,
    run_at: datetime | None = None,
    timeout_s: float | None = None,
    job_id: str | None = None,
) -> Job:
    """A new job: `scheduled` if `run_at` is still ahead, otherwise `queued`."""
    now = utcnow()
    job = Job(
        id=job_id or new_job_id(),
        tenant=tenant,
        type=type,
        status=JobState.SCHEDULED if run_at is not None and run_at > now else JobState.QUEUED,
        priority=priority,
        payload=payload,
        attempts=0,
        max_attempts=max_attempts,
        labels=labels or {},
        run_at=run_at,
        timeout_s=timeout_s,
        last_seq=1,  # event 1 is the job's first state
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.add_all(JobLabel(job_id=job.id, key=key, value=value) for key, value in (labels or {}).items())
    await session.flush()
    return job


async def get_job(session: AsyncSession, tenant: str, job_id: str) -> Job | None:
    """The tenant's job, or None: another tenant's job is indistinguishable from a missing one."""
    if not is_job_id(job_id):
        return None
    return await session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))


async def active_jobs(session: AsyncSession, tenant: str, limit: int) -> list[Job]:
    """The tenant's jobs that are not finished yet, newest first."""
    query = (
        select(Job)
        .where(Job.tenant == tenant, Job.status.not_in(sorted(TERMINAL_STATES)))
        .order_by(Job.created_at.desc())
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def count_waiting_jobs(session: AsyncSession, tenant: str) -> int:
    """How many of the tenant's jobs wait to run (scheduled or queued): what its queue limit counts."""
    query = select(func.count()).where(Job.tenant == tenant, Job.status.in_(sorted(WAITING_STATES)))
    return int(await session.scalar(query) or 0)


@dataclass(frozen=True)
class JobFilter:
    """What `list_jobs` selects; an empty collection or None means "any"."""

    statuses: Collection[JobState] = ()
    types: Collection[str] = ()
    priorities: Collection[int] = ()
    labels: dict[str, str] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None


async def list_jobs(
    session: AsyncSession,
    tenant: str,
    where: JobFilter,
    limit: int,
    before: tuple[datetime, str] | None = None,
) -> list[Job]:
    """The tenant's jobs matching `where`, newest first (ties broken by id), starting after the
    `(created_at, id)` position `before` of a previous page: keyset pagination, stable under inserts."""
    query = select(Job).where(Job.tenant == tenant)
    if where.statuses:
        query = query.where(Job.status.in_(sorted(where.statuses)))
    if where.types:
        query = query.where(Job.type.in_(sorted(where.types)))
    if where.priorities:
        query = query.where(Job.priority.in_(sorted(where.priorities)))
    for key, value in sorted(where.labels.items()):
        query = query.where(
            exists().where(JobLabel.job_id == Job.id, JobLabel.key == key, JobLabel.value == value)
        )
    if where.created_after is not None:
        query = query.where(Job.created_at >= where.created_after)
    if where.created_before is not None:
        query = query.where(Job.created_at < where.created_before)
    if before is not None:
        created_at, job_id = before
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    return list((await session.scalars(query)).all())


async def load_job(session: AsyncSession, job_id: str) -> Job | None:
    """A job by id alone, for services that act on messages rather than on a tenant's request."""
    return await session.get(Job, job_id, populate_existing=True)


async def transition(
    session: AsyncSession,
    job_id: str,
    target: JobState,
    *,
    attempt: int | None = None,
    source: JobState | None = None,
    **values: Any,
) -> Job | None:
    """Move a job to `target` if the lifecycle allows it from its current state (and that state is
    `source`, when given); None if not."""
    sources = sources_of(target)
    if source is not None:
        assert source in sources, f"{source} -> {target} is not a legal transition"
        sources = frozenset({source})
    statement = update(Job).where(Job.id == job_id, Job.status.in_(sorted(sources)))
    if attempt is not None:
        statement = statement.where(Job.attempts == attempt)
    statement = statement.values(status=target, last_seq=Job.last_seq + 1, updated_at=utcnow(), **values)
    return await _update_returning(session, statement)


async def claim_job(session: AsyncSession, job_id: str, worker_id: str, lease_s: float) -> Job | None:
    """queued -> running, with the next attempt number, the worker and its lease. None if not claimable."""
    now = utcnow()
    return await transition(
        session,
        job_id,
        JobState.RUNNING,
        attempts=Job.attempts + 1,
        worker_id=worker_id,
        started_at=now,
        lease_expires_at=now + timedelta(seconds=lease_s),
        progress_percent=None,
        progress_message=None,
    )


async def cancel_job(session: AsyncSession, job_id: str) -> Job | None:
    """Cancel a job that has not finished: a scheduled or queued one will never run; a running one's
    worker sees the change and stops its handler. None if the job is already terminal."""
    return await transition(session, job_id, JobState.CANCELED, finished_at=utcnow(), lease_expires_at=None)


async def canceled_jobs(session: AsyncSession, job_ids: Collection[str]) -> set[str]:
    """Of these jobs, the ones canceled: a worker asks this of the jobs it runs, often."""
    if not job_ids:
        return set()
    query = select(Job.id).where(Job.id.in_(list(job_ids)), Job.status == JobState.CANCELED)
    return set((await session.scalars(query)).all())


async def due_jobs(session: AsyncSession, limit: int) -> list[Job]:
    """Scheduled jobs whose `run_at` has come, the earliest first."""
    query = (
        select(Job)
        .where(Job.status == JobState.SCHEDULED, Job.run_at <= utcnow())
        .order_by(Job.run_at)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def queue_due_job(session: AsyncSession, job_id: str) -> Job | None:
    """scheduled -> queued; None if someone else queued or canceled it first."""
    return await transition(session, job_id, JobState.QUEUED, source=JobState.SCHEDULED)


async def renew_leases(
    session: AsyncSession, worker_id: str, attempts: dict[str, int], lease_s: float
) -> set[str]:
    """Push forward the leases of this worker's running attempts; returns the job ids it still holds."""
    if not attempts:
        return set()
    held_by_attempt = or_(
        *(and_(Job.id == job_id, Job.attempts == attempt) for job_id, attempt in attempts.items())
    )
    rows = await session.execute(
        update(Job)
        .where(held_by_attempt, Job.status == JobState.RUNNING, Job.worker_id == worker_id)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return set(rows.scalars().all())


async def lost_attempts(session: AsyncSession, worker_id: str, attempts: dict[str, int]) -> set[str]:
    """Of these attempts, the ones whose job was taken from them: by another attempt or worker, by a
    cancel, or by the reaper (which records LEASE_EXPIRED). An attempt that recorded its own outcome
    meanwhile (succeeded, failed, or queued again for a retry) has lost nothing."""
    if not attempts:
        return set()
    jobs = await session.scalars(select(Job).where(Job.id.in_(list(attempts))))
    return {
        job.id
        for job in jobs
        if job.attempts != attempts[job.id]
        or job.worker_id != worker_id
        or job.status == JobState.CANCELED
        or (job.error or {}).get("type") == LEASE_EXPIRED
    }


async def expired_leases(session: AsyncSession, limit: int) -> list[Job]:
    """Running jobs whose worker stopped renewing its lease: it died or lost the database."""
    query = (
        select(Job)
        .where(Job.status == JobState.RUNNING, Job.lease_expires_at < utcnow())
        .order_by(Job.lease_expires_at)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def record_progress(
    session: AsyncSession, job_id: str, attempt: int, percent: float | None, message: str | None
) -> Job | None:
    """Store the running attempt's latest progress. None if the attempt no longer owns the job."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobState.RUNNING, Job.attempts == attempt)
        .values(
            progress_percent=percent,
            progress_message=message,
            last_seq=Job.last_seq + 1,
            updated_at=utcnow(),
        )
    )
    return await _update_returning(session, statement)


async def complete_job(session: AsyncSession, job_id: str, attempt: int, result: Any) -> Job | None:
    return await transition(
        session,
        job_id,
        JobState.SUCCEEDED,
        attempt=attempt,
        result=result,
        error=None,
        progress_percent=100.0,
        finished_at=utcnow(),
        lease_expires_at=None,
    )


async def fail_attempt(
    session: AsyncSession, job: Job, error: dict[str, Any], retry_at: datetime | None = None
) -> Job | None:
    """Record a failed attempt. With attempts left the job waits for its next one: `scheduled` until
    `retry_at` (its backoff), or `queued` at once without one. With none left it is `failed`."""
    if job.attempts >= job.max_attempts:
        return await transition(
            session,
            job.id,
            JobState.FAILED,
            attempt=job.attempts,
            error=error,
            finished_at=utcnow(),
            lease_expires_at=None,
        )
    # Attempts left: queued at once, or scheduled for its retry time.
    target, when = (JobState.QUEUED, {}) if retry_at is None else (JobState.SCHEDULED, {"run_at": retry_at})
    return await transition(
        session,
        job.id,
        target,
        attempt=job.attempts,
        source=JobState.RUNNING,
        error=error,
        lease_expires_at=None,
        **when,
    )


async def hand_back_job(session: AsyncSession, job: Job, worker_id: str) -> Job | None:
    """running -> queued at once, for an attempt a draining worker could not finish. The attempt was
    not the job's fault, so it does not use up one of its attempts: `max_attempts` grows by one (the
    attempt number itself must still grow, so a late outcome of this attempt stays fenced off)."""
    error = {
        "type": HANDED_BACK,
        "message": f"worker {worker_id} stopped before the attempt finished; it does not count",
        "attempt": job.attempts,
    }
    return await transition(
        session,
        job.id,
        JobState.QUEUED,
        attempt=job.attempts,
        source=JobState.RUNNING,
        error=error,
        max_attempts=Job.max_attempts + 1,
        lease_expires_at=None,
    )


async def retry_job(session: AsyncSession, job_id: str, attempts: int) -> Job | None:
    """failed -> queued, with `attempts` more attempts; None unless the job is failed. Its attempt
    numbers go on from where they were, and its last error stays until the next attempt ends."""
    return await transition(
        session,
        job_id,
        JobState.QUEUED,
        source=JobState.FAILED,
        max_attempts=Job.attempts + attempts,
        finished_at=None,
        run_at=None,
    )


def announce(
    session: AsyncSession, prefix: str, job: Job, kind: Literal["state", "progress"]
) -> OutboxMessage:
    """Record the event for the job's latest change in its history, and stage it for the events topic,
    keyed by job id so a job's events stay on one partition."""
    event = event_for(job, kind)
    record_event(session, event)
    return stage_message(session, events_topic(prefix), job.id, event)


def announce_state(session: AsyncSession, prefix: str, job: Job) -> list[OutboxMessage]:
    """Stage the event for a state change; and the job's message too if it is queued again, or its
    dead letter if it failed for good."""
    rows = [announce(session, prefix, job, "state")]
    if job.status == JobState.QUEUED:
        rows.append(enqueue(session, prefix, job))
    elif job.status == JobState.FAILED:
        rows.append(stage_message(session, dead_letter_topic(prefix), job.id, dead_letter_for(job)))
    return rows


def enqueue(session: AsyncSession, prefix: str, job: Job) -> OutboxMessage:
    """Stage the job's message on its priority topic, keyed so a tenant's jobs stay on few partitions."""
    key = job_key(job.tenant, job.id)
    return stage_message(session, job_topic(prefix, job.priority), key, job_message_for(job))


async def _update_returning(session: AsyncSession, statement: Any) -> Job | None:
    result = await session.execute(
        statement.returning(Job).execution_options(synchronize_session=False, populate_existing=True)
    )
    return result.scalars().first()
