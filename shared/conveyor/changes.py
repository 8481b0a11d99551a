"""Every change to a job, as data, and the one function that writes a batch of them.

Each service says what should happen to its jobs (`NewJob`, `Claim`, `Transition`, `ProgressReport`)
and hands the changes to `write_changes`, which writes a whole batch in the caller's transaction. It
holds the invariant of the event stream in one place: a change that takes effect bumps the job's
`last_seq`, and the event numbered with it is written to the job's history (`job_events`) and staged
in the outbox, in the same transaction as the change; a job queued again also gets its job message,
and a job failed for good its dead letter. Once the transaction commits, the outbox rows go to the
relay (`conveyor.committer` does both).

Status changes are conditional updates built from the lifecycle (`conveyor.lifecycle`): a `Transition`
matches only rows in a legal source state and, when it names one, only the given attempt, so a stale
or repeated writer changes nothing and is told so (`Outcome.STALE`). A batch never fails for one item:
an idempotency key already used, a tenant over its queue limit or a job in the wrong state is that
item's own result. Changes are grouped in `Unit`s, one per caller; an `atomic` unit of new jobs is
created whole or not at all.

Everything here is Core SQL on a sync `Connection`: no ORM identity map or flush on the hot path.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    Update,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from conveyor.clock import database_now
from conveyor.events import dead_letter_for, event_json, job_message_json
from conveyor.jsoncodec import dumps
from conveyor.lifecycle import WAITING_STATES, IllegalTransition, JobState, sources_of
from conveyor.models import (
    JOB_COLUMNS,
    JOBS,
    WORKER_HEARTBEATS,
    IdempotencyKey,
    JobEventRecord,
    JobLabel,
    JobRecord,
    utcnow,
)
from conveyor.outbox import Message, OutboxRow, stage_messages
from conveyor.topics import dead_letter_topic, events_topic, job_key, job_topic

LABELS: Table = JobLabel.__table__  # type: ignore[assignment]
KEYS: Table = IdempotencyKey.__table__  # type: ignore[assignment]
EVENTS: Table = JobEventRecord.__table__  # type: ignore[assignment]
WAITING = sorted(WAITING_STATES)

# The error type recorded on an attempt whose worker stopped renewing its lease.
LEASE_EXPIRED = "LeaseExpired"
# The error type recorded on an attempt that ran longer than its timeout (the job's or its type's).
TIMED_OUT = "timed_out"
# The error type recorded on an attempt a draining worker gave back unfinished; it does not count.
HANDED_BACK = "handed_back"
# Hand-backs that do not count as attempts; past them, one counts, and the job waits a while first.
MAX_FREE_HAND_BACKS = 2
# How long a job handed back more often than that waits before it runs again: long enough for a
# scale-in under way to be over, so the worker that takes it is one that stays.
HAND_BACK_WAIT_S = 30.0


def new_job_id() -> str:
    return str(uuid.uuid4())


# --- the changes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A new job's `Idempotency-Key`: the key, the fingerprint of the request, and how long it holds."""

    key: str
    fingerprint: str
    window_s: float


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to create: `scheduled` if `run_at` is still ahead, otherwise `queued`."""

    tenant: str
    type: str
    payload: Any
    priority: int
    max_attempts: int
    labels: Mapping[str, str] = field(default_factory=dict)
    run_at: datetime | None = None
    timeout_s: float | None = None
    idempotency: IdempotencyClaim | None = None
    # Refuse the job (Outcome.OVER_QUOTA) if its tenant already has this many jobs waiting to run.
    max_queued: int | None = None
    id: str = field(default_factory=new_job_id)


@dataclass(frozen=True, slots=True)
class Claim:
    """queued -> running for `worker_id`, with the next attempt number and a lease."""

    job_id: str
    worker_id: str
    lease_s: float
    # The trace context of the claim (`conveyor.tracing`): a worker claims many jobs at once, each in
    # its own trace, so a claim carries its own rather than its unit's.
    trace: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """Move a job to `target` if the lifecycle allows it from its current state; with `source`, only
    from that state; with `attempt`, only while that is its attempt; with `tenant`, only that tenant's
    job. `values` are the other columns to set, as plain values."""

    job_id: str
    target: JobState
    values: Mapping[str, Any] = field(default_factory=dict)
    attempt: int | None = None
    source: JobState | None = None
    tenant: str | None = None
    # For a transition to a waiting state: refuse it if the tenant already has this many waiting.
    max_queued: int | None = None
    # With it, only an abandoned attempt (`attempt_abandoned`): its worker's heartbeat is older than
    # this, or its lease ran out. The reaper's check, made again in the update itself, so that a renewal
    # or a heartbeat committed since the reaper looked keeps the attempt.
    abandoned_after_s: float | None = None
    # For a job queued again: the partition of its job message, if not its key's (see `expire_lease`).
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """The running attempt's latest progress."""

    job_id: str
    attempt: int
    percent: float | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Republish:
    """A queued job's job message, published again because the last one was lost (consumed without a
    claim, or deleted from its topic): no state change and no event, only the message."""

    job_id: str


Change = NewJob | Claim | Transition | ProgressReport | Republish


@dataclass(frozen=True, slots=True)
class Unit:
    """The changes of one caller, answered together. An atomic unit (of new jobs) is written whole or
    not at all: if one of its jobs is refused, the others are `ABANDONED`."""

    changes: Sequence[Change]
    atomic: bool = False
    # The caller's trace context (`conveyor.tracing`: a carrier), if it traces: the messages its
    # changes stage carry it, and a new job keeps it as its own. Without one, a change's messages
    # continue the job's trace (the one it was submitted in).
    trace: str | None = None


class Outcome(enum.Enum):
    WRITTEN = "written"  # the change took effect; `job` is the row as written
    REPLAYED = "replayed"  # a new job whose idempotency key was used before; `job` is that key's job
    STALE = "stale"  # the job's state or attempt does not allow it; `job` is its row (tenant-scoped only)
    NOT_FOUND = "not_found"  # no such job (for the tenant)
    OVER_QUOTA = "over_quota"  # the tenant has `waiting` jobs waiting, its limit
    KEY_REUSED = "key_reused"  # the idempotency key was used with another request body
    KEY_ORPHANED = "key_orphaned"  # the idempotency key's job no longer exists
    ABANDONED = "abandoned"  # another change of its atomic unit was refused


@dataclass(frozen=True, slots=True)
class ChangeResult:
    outcome: Outcome
    job: JobRecord | None = None
    waiting: int | None = None

    @property
    def written(self) -> bool:
        return self.outcome is Outcome.WRITTEN


@dataclass(slots=True)
class Written:
    """What a batch did: a result per change of each unit, and the outbox rows it staged, in order."""

    results: list[list[ChangeResult]]
    outbox: list[OutboxRow]


# --- the changes of the lifecycle, by name -------------------------------------------------------------


def claim(job_id: str, worker_id: str, lease_s: float, trace: str | None = None) -> Claim:
    return Claim(job_id, worker_id, lease_s, trace)


def republish(job_id: str) -> Republish:
    return Republish(job_id)


def complete(job: JobRecord, result: Any) -> Transition:
    return Transition(
        job.id,
        JobState.SUCCEEDED,
        {
            "result": result,
            "error": None,
            "progress_percent": 100.0,
            "finished_at": utcnow(),
            "lease_expires_at": None,
        },
        attempt=job.attempts,
    )


def fail_attempt(job: JobRecord, error: dict[str, Any], retry_at: datetime | None = None) -> Transition:
    """A failed attempt. With attempts left the job waits for its next one: `scheduled` until
    `retry_at` (its backoff), or `queued` at once without one. With none left it is `failed`."""
    if job.attempts >= job.max_attempts:
        values = {"error": error, "finished_at": utcnow(), "lease_expires_at": None}
        return Transition(job.id, JobState.FAILED, values, attempt=job.attempts)
    if retry_at is None:
        values = {"error": error, "lease_expires_at": None}
        return Transition(job.id, JobState.QUEUED, values, attempt=job.attempts, source=JobState.RUNNING)
    values = {"error": error, "lease_expires_at": None, "run_at": retry_at}
    return Transition(job.id, JobState.SCHEDULED, values, attempt=job.attempts, source=JobState.RUNNING)


def hand_back(job: JobRecord, worker_id: str) -> Transition:
    """running -> queued at once, for an attempt a draining worker could not finish. The attempt was
    not the job's fault, so the first MAX_FREE_HAND_BACKS do not use up one of its attempts:
    `max_attempts` grows by one (the attempt number itself must still grow, so a late outcome of this
    attempt stays fenced off). Past them the attempt counts, and the job waits HAND_BACK_WAIT_S
    (`scheduled`) before it runs again: under a scale-in that keeps coming, a long job would otherwise
    restart forever."""
    hand_backs = job.hand_backs + 1
    if job.hand_backs < MAX_FREE_HAND_BACKS:
        error = {
            "type": HANDED_BACK,
            "message": f"worker {worker_id} stopped before the attempt finished; it does not count",
            "attempt": job.attempts,
        }
        # While the attempt runs nothing else changes `max_attempts` (only a retry does, of a failed job).
        fields = {
            "error": error,
            "max_attempts": job.max_attempts + 1,
            "lease_expires_at": None,
            "hand_backs": hand_backs,
        }
        return Transition(job.id, JobState.QUEUED, fields, attempt=job.attempts, source=JobState.RUNNING)
    error = {
        "type": HANDED_BACK,
        "message": (
            f"worker {worker_id} stopped before the attempt finished; handed back {hand_backs} times, "
            f"so this attempt counts and the job waits {HAND_BACK_WAIT_S:g} s"
        ),
        "attempt": job.attempts,
    }
    retry_at = utcnow() + timedelta(seconds=HAND_BACK_WAIT_S)
    counted = fail_attempt(job, error, retry_at)
    return replace(counted, values={**counted.values, "hand_backs": hand_backs})


def expire_lease(job: JobRecord, dead_after_s: float, partition: int | None = None) -> Transition:
    """The reaper's change for a running job whose worker is dead: its heartbeat is older than
    `dead_after_s`, or its lease ran out. It applies only if that is still so when it is written.
    Queued again, the job's message goes to `partition` (one the reaper consumes), not to its key's,
    which the dead worker may still hold in the consumer group until Kafka's session timeout."""
    error = {
        "type": LEASE_EXPIRED,
        "message": f"worker {job.worker_id} stopped: no heartbeat and no lease renewal",
        "attempt": job.attempts,
    }
    return replace(fail_attempt(job, error), abandoned_after_s=dead_after_s, partition=partition)


def attempt_abandoned(
    now: datetime | ColumnElement[Any], dead_before: datetime | ColumnElement[Any]
) -> ColumnElement[bool]:
    """A running job's attempt that nobody runs any more, by the database's clock `now`: its worker's
    heartbeat is from before `dead_before`, or its lease has run out. A worker that keeps no heartbeat
    (one from before heartbeats) is judged by its lease alone."""
    heartbeat_stopped = exists().where(
        WORKER_HEARTBEATS.c.worker_id == JOBS.c.worker_id, WORKER_HEARTBEATS.c.heartbeat_at < dead_before
    )
    return or_(JOBS.c.lease_expires_at < now, heartbeat_stopped)


def cancel(job_id: str, tenant: str | None = None) -> Transition:
    """Cancel a job that has not finished: a scheduled or queued one will never run; a running one's
    worker sees the change and stops its handler."""
    return Transition(
        job_id, JobState.CANCELED, {"finished_at": utcnow(), "lease_expires_at": None}, tenant=tenant
    )


def retry(job: JobRecord, attempts: int, max_queued: int | None = None) -> Transition:
    """failed -> queued, with `attempts` more attempts. Its attempt numbers go on from where they were,
    and its last error stays until the next attempt ends. (While it is failed its attempt count cannot
    change, and the transition only applies to a failed job.)"""
    fields = {"max_attempts": job.attempts + attempts, "finished_at": None, "run_at": None}
    return Transition(
        job.id, JobState.QUEUED, fields, source=JobState.FAILED, tenant=job.tenant, max_queued=max_queued
    )


def queue_due(job_id: str) -> Transition:
    """scheduled -> queued, once its time has come."""
    return Transition(job_id, JobState.QUEUED, source=JobState.SCHEDULED)


def progress(job_id: str, attempt: int, percent: float | None, message: str | None) -> ProgressReport:
    return ProgressReport(job_id, attempt, percent, message)


# --- writing a batch ------------------------------------------------------------------------------------

# A count of a tenant's waiting jobs is used again for up to this long...
COUNT_REUSE_S = 1.0
# ...unless it and what the batch asks for come within this share of the tenant's limit: then it is
# counted in the database, so a limit is held exactly where it binds.
COUNT_NEAR_LIMIT = 0.9


class WaitingCounts:
    """What one process remembers of its tenants' jobs waiting to run, so that a batch need not count
    them in the database (a count that walks every waiting job of the tenant) while a tenant is far
    below its limit. The memory adds the jobs the process itself queues, but not those that other
    processes queue or that workers take meanwhile; so it is forgotten after COUNT_REUSE_S, and never
    trusted near the limit."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, int]] = {}

    def known(self, tenant: str, limit: int, asked: int) -> int | None:
        """The remembered count, if it may be used for `asked` more jobs under `limit`."""
        entry = self._counts.get(tenant)
        if entry is None or time.monotonic() - entry[0] > COUNT_REUSE_S:
            return None
        count = entry[1]
        return count if count + asked < COUNT_NEAR_LIMIT * limit else None

    def counted(self, tenant: str, count: int) -> None:
        self._counts[tenant] = (time.monotonic(), count)

    def added(self, tenant: str, count: int) -> None:
        entry = self._counts.get(tenant)
        if entry is not None:
            self._counts[tenant] = (entry[0], entry[1] + count)


def write_changes(
    connection: Connection, units: Sequence[Unit], prefix: str, counts: WaitingCounts | None = None
) -> Written:
    """Write every change of `units` in the caller's transaction, in order; what each did, and the
    outbox rows to hand to the relay once the transaction has committed. `counts` is what the process
    remembers of its tenants' waiting jobs (see `WaitingCounts`); without it, every limit checked is
    counted in the database."""
    # The database's clock: leases, key expiry and the outbox rows' age are compared by other processes.
    batch = _Batch(connection, prefix, database_now(connection), counts)
    results: list[list[ChangeResult | None]] = [[None] * len(unit.changes) for unit in units]
    new_jobs = [
        (u, c, change)
        for u, unit in enumerate(units)
        for c, change in enumerate(unit.changes)
        if isinstance(change, NewJob)
    ]
    # The tenants whose limit this batch checks, each with its limit and how many jobs it asks for.
    wanted: dict[str, tuple[int, int]] = {}
    for unit in units:
        for change in unit.changes:
            if isinstance(change, NewJob | Transition) and change.max_queued is not None and change.tenant:
                limit, asked = wanted.get(change.tenant, (change.max_queued, 0))
                wanted[change.tenant] = (min(limit, change.max_queued), asked + 1)
    batch.count_waiting(wanted)
    if new_jobs:
        batch.create_jobs(units, new_jobs, results)
    # Existing jobs: first the claims, each unit's consecutive claims one statement (PostgreSQL locks
    # their rows in id order); then the other changes one by one, in job id order (a job's own changes in
    # the order given). Transactions that lock rows in one order cannot deadlock on them.
    others: list[tuple[str, int, int, int, Transition | ProgressReport | Republish]] = []
    for u, unit in enumerate(units):
        changes = unit.changes
        c = 0
        while c < len(changes):
            change = changes[c]
            if isinstance(change, Claim):
                end = c
                while end < len(changes) and _same_claim(changes[end], change):
                    end += 1
                claims = [claim for claim in changes[c:end] if isinstance(claim, Claim)]
                for offset, result in enumerate(batch.claim(claims, unit.trace)):
                    results[u][c + offset] = result
                c = end
                continue
            if isinstance(change, Transition | ProgressReport | Republish):
                others.append((change.job_id, len(others), u, c, change))
            c += 1
    for _, _, u, c, change in sorted(others, key=lambda item: (item[0], item[1])):
        trace = units[u].trace
        if isinstance(change, Transition):
            results[u][c] = batch.transition(change, trace)
        elif isinstance(change, ProgressReport):
            results[u][c] = batch.progress(change, trace)
        else:
            results[u][c] = batch.republish(change)
    outbox = batch.flush()
    return Written(
        [[result or ChangeResult(Outcome.ABANDONED) for result in unit] for unit in results], outbox
    )


def _same_claim(change: Change, first: Claim) -> bool:
    return isinstance(change, Claim) and (change.worker_id, change.lease_s) == (
        first.worker_id,
        first.lease_s,
    )


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """An idempotency key already recorded: the request's fingerprint and the job it created."""

    fingerprint: str
    job: JobRecord | None

    def answer(self, fingerprint: str) -> ChangeResult:
        """What a new item with this key gets: the key's job if it is the same request."""
        if self.job is None:
            return ChangeResult(Outcome.KEY_ORPHANED)
        if fingerprint != self.fingerprint:
            return ChangeResult(Outcome.KEY_REUSED)
        return ChangeResult(Outcome.REPLAYED, self.job)


class _Batch:
    """One batch being written: the statements, and the events and outbox rows they stage."""

    def __init__(
        self, connection: Connection, prefix: str, now: datetime, counts: WaitingCounts | None
    ) -> None:
        self.connection = connection
        self.prefix = prefix
        self.now = now
        self.counts = counts
        self.events: list[dict[str, Any]] = []
        self.staged: list[Message] = []  # (topic, key, value, partition, headers) for the outbox
        # Jobs waiting to run, per tenant whose limit a change of this batch checks.
        self.waiting: Counter[str] = Counter()

    # --- announcing ---

    def announce(
        self,
        job: JobRecord,
        kind: Literal["state", "progress"],
        partition: int | None = None,
        trace: str | None = None,
    ) -> None:
        """The event of the job's latest change into its history and the outbox; and after a state
        change, its job message if it is queued again (to `partition`, if given), or its dead letter if
        it failed for good. The messages carry `trace`, the change's trace context, else the job's."""
        headers = trace or job.trace_context
        body = event_json(job, kind)
        self.events.append({"job_id": job.id, "seq": job.last_seq, "body": body.decode()})
        self.staged.append((events_topic(self.prefix), job.id, body, None, headers))
        if kind != "state":
            return
        if job.status == JobState.QUEUED:
            topic = job_topic(self.prefix, job.priority)
            self.staged.append((topic, job_key(job.id), job_message_json(job), partition, headers))
        elif job.status == JobState.FAILED:
            letter = dumps(dead_letter_for(job).model_dump(mode="json"))
            self.staged.append((dead_letter_topic(self.prefix), job.id, letter, None, headers))

    def flush(self) -> list[OutboxRow]:
        """Write the batch's events to the jobs' histories and its messages to the outbox."""
        if self.events:
            self.connection.execute(insert(EVENTS), self.events)
        return stage_messages(self.connection, self.staged, self.now)

    # --- quotas ---

    def count_waiting(self, wanted: dict[str, tuple[int, int]]) -> None:
        """The jobs waiting to run of each tenant whose limit this batch checks (`wanted`: its limit and
        how many jobs the batch asks for): remembered, when far enough below the limit for a slightly
        old count to make no difference; else counted, in one query for all of them."""
        tenants = []
        for tenant, (limit, asked) in wanted.items():
            known = self.counts.known(tenant, limit, asked) if self.counts is not None else None
            if known is None:
                tenants.append(tenant)
            else:
                self.waiting[tenant] = known
        if not tenants:
            return
        query = (
            select(JOBS.c.tenant, func.count())
            .where(JOBS.c.tenant.in_(sorted(tenants)), JOBS.c.status.in_(WAITING))
            .group_by(JOBS.c.tenant)
        )
        counted = dict.fromkeys(tenants, 0)
        counted.update({tenant: int(count) for tenant, count in self.connection.execute(query)})
        for tenant, count in counted.items():
            self.waiting[tenant] = count
            if self.counts is not None:
                self.counts.counted(tenant, count)

    def added_waiting(self, tenant: str, count: int) -> None:
        """This batch puts `count` more of the tenant's jobs in a waiting state."""
        self.waiting[tenant] += count
        if self.counts is not None:
            self.counts.added(tenant, count)

    # --- new jobs ---

    def create_jobs(
        self,
        units: Sequence[Unit],
        new_jobs: list[tuple[int, int, NewJob]],
        results: list[list[ChangeResult | None]],
    ) -> None:
        """Decide each new job (created, replayed from its key, or refused), then create the lot."""
        known = self._live_keys([job for _, _, job in new_jobs])
        # The first item of the batch to create a job with each key, and the items answered with its job.
        first_with_key: dict[tuple[str, str], tuple[int, int, str]] = {}
        same_as: dict[tuple[int, int], tuple[int, int]] = {}
        created: list[tuple[int, int, NewJob]] = []
        for u, unit in enumerate(units):
            mine = [(c, job) for uu, c, job in new_jobs if uu == u]
            decided: dict[int, ChangeResult] = {}
            unit_keys: dict[tuple[str, str], tuple[int, int, str]] = {}
            unit_same: dict[tuple[int, int], tuple[int, int]] = {}
            taken: Counter[str] = Counter()
            for c, job in mine:
                if job.idempotency is not None:
                    pair = (job.tenant, job.idempotency.key)
                    fingerprint = job.idempotency.fingerprint
                    if pair in known:
                        decided[c] = known[pair].answer(fingerprint)
                        continue
                    first = first_with_key.get(pair) or unit_keys.get(pair)
                    if first is not None:
                        if first[2] == fingerprint:
                            unit_same[(u, c)] = first[:2]
                        else:
                            decided[c] = ChangeResult(Outcome.KEY_REUSED)
                        continue
                    unit_keys[pair] = (u, c, fingerprint)
                if job.max_queued is not None:
                    waiting = self.waiting[job.tenant] + taken[job.tenant]
                    if waiting >= job.max_queued:
                        decided[c] = ChangeResult(Outcome.OVER_QUOTA, waiting=waiting)
                        continue
                taken[job.tenant] += 1
            refused = any(result.outcome is not Outcome.REPLAYED for result in decided.values())
            if unit.atomic and refused:
                for c, _ in mine:
                    results[u][c] = decided.get(c, ChangeResult(Outcome.ABANDONED))
                continue
            for c, job in mine:
                if c in decided:
                    results[u][c] = decided[c]
                elif (u, c) not in unit_same:
                    created.append((u, c, job))
            first_with_key.update(unit_keys)
            same_as.update(unit_same)
            for tenant, count in taken.items():
                self.added_waiting(tenant, count)
        created = self._remember_keys(units, created, results)
        self._insert_jobs(units, created, results)
        for (u, c), (fu, fc) in same_as.items():
            first_result = results[fu][fc]
            if first_result is not None and first_result.outcome is Outcome.WRITTEN:
                results[u][c] = ChangeResult(Outcome.REPLAYED, first_result.job)
            else:
                results[u][c] = first_result

    def _live_keys(self, jobs: list[NewJob]) -> dict[tuple[str, str], _KeyRecord]:
        """The live records of the batch's idempotency keys. Expired ones are deleted first, so their
        keys can be used anew."""
        pairs = sorted({(job.tenant, job.idempotency.key) for job in jobs if job.idempotency is not None})
        if not pairs:
            return {}
        in_batch = tuple_(KEYS.c.tenant, KEYS.c.key).in_(pairs)
        self.connection.execute(delete(KEYS).where(in_batch, KEYS.c.expires_at <= self.now))
        return self._key_records(pairs)

    def _key_records(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], _KeyRecord]:
        query = select(KEYS.c.tenant, KEYS.c.key, KEYS.c.fingerprint, KEYS.c.job_id).where(
            tuple_(KEYS.c.tenant, KEYS.c.key).in_(pairs)
        )
        found = self.connection.execute(query).all()
        jobs = {job.id: job for job in read_jobs(self.connection, [row.job_id for row in found])}
        return {(row.tenant, row.key): _KeyRecord(row.fingerprint, jobs.get(row.job_id)) for row in found}

    def _remember_keys(
        self,
        units: Sequence[Unit],
        created: list[tuple[int, int, NewJob]],
        results: list[list[ChangeResult | None]],
    ) -> list[tuple[int, int, NewJob]]:
        """Record the idempotency keys of the jobs to create. A key that another process recorded a
        moment ago (PostgreSQL; on SQLite writers take turns) loses: its item answers with that key's
        job, and the job is not created (nor, if its unit is atomic, the rest of the unit)."""
        keyed = [(u, c, job) for u, c, job in created if job.idempotency is not None]
        if not keyed:
            return created
        rows = [
            {
                "tenant": job.tenant,
                "key": job.idempotency.key,
                "fingerprint": job.idempotency.fingerprint,
                "job_id": job.id,
                "created_at": self.now,
                "expires_at": self.now + timedelta(seconds=job.idempotency.window_s),
            }
            for _, _, job in keyed
            if job.idempotency is not None
        ]
        dialect = postgresql if self.connection.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(KEYS).on_conflict_do_nothing().returning(KEYS.c.tenant, KEYS.c.key)
        won = {(row.tenant, row.key) for row in self.connection.execute(statement, rows)}
        lost = [
            (u, c, job)
            for u, c, job in keyed
            if job.idempotency and (job.tenant, job.idempotency.key) not in won
        ]
        if not lost:
            return created
        records = self._key_records(
            sorted({(job.tenant, job.idempotency.key) for _, _, job in lost if job.idempotency is not None})
        )
        dropped_units: set[int] = set()
        for u, c, job in lost:
            assert job.idempotency is not None
            record = records.get((job.tenant, job.idempotency.key))
            answer = (
                record.answer(job.idempotency.fingerprint) if record else ChangeResult(Outcome.KEY_ORPHANED)
            )
            results[u][c] = answer
            if units[u].atomic and answer.outcome is not Outcome.REPLAYED:
                dropped_units.add(u)
        lost_positions = {(u, c) for u, c, _ in lost}
        kept: list[tuple[int, int, NewJob]] = []
        for u, c, job in created:
            if (u, c) in lost_positions:
                continue
            if u in dropped_units:
                results[u][c] = ChangeResult(Outcome.ABANDONED)
                if job.idempotency is not None:
                    self.connection.execute(
                        delete(KEYS).where(KEYS.c.tenant == job.tenant, KEYS.c.key == job.idempotency.key)
                    )
                continue
            kept.append((u, c, job))
        return kept

    def _insert_jobs(
        self,
        units: Sequence[Unit],
        created: list[tuple[int, int, NewJob]],
        results: list[list[ChangeResult | None]],
    ) -> None:
        if not created:
            return
        records = [self._record_of(job, units[u].trace) for u, _, job in created]
        self.connection.execute(insert(JOBS), [_columns(record) for record in records])
        labels = [
            {"job_id": job.id, "key": key, "value": value}
            for _, _, job in created
            for key, value in job.labels.items()
        ]
        if labels:
            self.connection.execute(insert(LABELS), labels)
        for (u, c, _), record in zip(created, records, strict=True):
            results[u][c] = ChangeResult(Outcome.WRITTEN, record)
            self.announce(record, "state")

    def _record_of(self, job: NewJob, trace: str | None) -> JobRecord:
        scheduled = job.run_at is not None and job.run_at > self.now
        return JobRecord(
            id=job.id,
            tenant=job.tenant,
            type=job.type,
            status=JobState.SCHEDULED if scheduled else JobState.QUEUED,
            priority=job.priority,
            payload=job.payload,
            result=None,
            error=None,
            progress_percent=None,
            progress_message=None,
            attempts=0,
            max_attempts=job.max_attempts,
            labels=dict(job.labels),
            run_at=job.run_at,
            timeout_s=job.timeout_s,
            last_seq=1,  # event 1 is the job's first state
            worker_id=None,
            lease_expires_at=None,
            created_at=self.now,
            updated_at=self.now,
            started_at=None,
            finished_at=None,
            trace_context=trace,
        )

    # --- existing jobs ---

    def claim(self, claims: list[Claim], trace: str | None) -> list[ChangeResult]:
        first = claims[0]
        parameters = {
            "b_job_ids": [claim.job_id for claim in claims],
            "b_worker_id": first.worker_id,
            "b_now": self.now,
            "b_lease_expires_at": self.now + timedelta(seconds=first.lease_s),
        }
        claimed = {row.id: JobRecord(*row) for row in self.connection.execute(CLAIM, parameters)}
        # pop: the same job twice in one batch is claimed once.
        return [
            self._announced(claimed.pop(claim.job_id, None), "state", trace=claim.trace or trace)
            for claim in claims
        ]

    def transition(self, change: Transition, trace: str | None = None) -> ChangeResult:
        if change.max_queued is not None and change.tenant is not None and change.target in WAITING_STATES:
            waiting = self.waiting[change.tenant]
            if waiting >= change.max_queued:
                return ChangeResult(Outcome.OVER_QUOTA, self._current(change), waiting=waiting)
        statement = _transition_statement(change)
        parameters = {
            "b_job_id": change.job_id,
            "b_now": self.now,
            "b_attempt": change.attempt,
            "b_tenant": change.tenant,
        }
        if change.abandoned_after_s is not None:
            parameters["b_dead_before"] = self.now - timedelta(seconds=change.abandoned_after_s)
        parameters.update({f"set_{name}": value for name, value in change.values.items()})
        row = self.connection.execute(statement, parameters).first()
        if row is None:
            return self._refused(change)
        if change.tenant is not None and change.target in WAITING_STATES:
            self.added_waiting(change.tenant, 1)
        return self._announced(JobRecord(*row), "state", change.partition, trace)

    def progress(self, change: ProgressReport, trace: str | None = None) -> ChangeResult:
        parameters = {
            "b_job_id": change.job_id,
            "b_attempt": change.attempt,
            "b_percent": change.percent,
            "b_message": change.message,
            "b_now": self.now,
        }
        row = self.connection.execute(PROGRESS, parameters).first()
        return self._announced(None if row is None else JobRecord(*row), "progress", trace=trace)

    def republish(self, change: Republish) -> ChangeResult:
        row = self.connection.execute(REPUBLISH, {"b_job_id": change.job_id, "b_now": self.now}).first()
        if row is None:
            return ChangeResult(Outcome.STALE)  # not queued any more: nothing was lost
        job = JobRecord(*row)
        # The sweep makes no traced call: the message continues the job's own trace.
        topic, message = job_topic(self.prefix, job.priority), job_message_json(job)
        self.staged.append((topic, job_key(job.id), message, None, job.trace_context))
        return ChangeResult(Outcome.WRITTEN, job)

    def _announced(
        self,
        job: JobRecord | None,
        kind: Literal["state", "progress"],
        partition: int | None = None,
        trace: str | None = None,
    ) -> ChangeResult:
        if job is None:
            return ChangeResult(Outcome.STALE)
        self.announce(job, kind, partition, trace)
        return ChangeResult(Outcome.WRITTEN, job)

    def _refused(self, change: Transition) -> ChangeResult:
        """A tenant's request is told why its change did not apply: no such job of its, or the job as it
        is now (its state forbids it). A worker's change only needs to know that it did not."""
        if change.tenant is None:
            return ChangeResult(Outcome.STALE)
        current = self._current(change)
        return ChangeResult(Outcome.STALE if current is not None else Outcome.NOT_FOUND, current)

    def _current(self, change: Transition) -> JobRecord | None:
        jobs = read_jobs(self.connection, [change.job_id], tenant=change.tenant)
        return jobs[0] if jobs else None


# --- the statements: built once, so SQLAlchemy compiles each once and reuses it ----------------------
# Their parameters are named `b_...` (and `set_<column>`): a parameter of an UPDATE named like a column
# would be taken for a value to set it to.


def _in_states(states: Iterable[JobState]) -> ColumnElement[bool]:
    """`status IN (...)` for a fixed set, written as equalities: no list to expand at every execution."""
    return or_(*(JOBS.c.status == state.value for state in sorted(states)))


CLAIM = (
    update(JOBS)
    .where(JOBS.c.id.in_(bindparam("b_job_ids", expanding=True)), _in_states(sources_of(JobState.RUNNING)))
    .values(
        status=JobState.RUNNING.value,
        attempts=JOBS.c.attempts + 1,
        worker_id=bindparam("b_worker_id"),
        started_at=bindparam("b_now"),
        lease_expires_at=bindparam("b_lease_expires_at"),
        progress_percent=None,
        progress_message=None,
        last_seq=JOBS.c.last_seq + 1,
        updated_at=bindparam("b_now"),
    )
    .returning(*JOB_COLUMNS)
)

PROGRESS = (
    update(JOBS)
    .where(
        JOBS.c.id == bindparam("b_job_id"),
        JOBS.c.status == JobState.RUNNING.value,
        JOBS.c.attempts == bindparam("b_attempt"),
    )
    .values(
        progress_percent=bindparam("b_percent"),
        progress_message=bindparam("b_message"),
        last_seq=JOBS.c.last_seq + 1,
        updated_at=bindparam("b_now"),
    )
    .returning(*JOB_COLUMNS)
)

# Touches `updated_at` only: a republished job counts as fresh for the sweep's grace again.
REPUBLISH = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_job_id"), JOBS.c.status == JobState.QUEUED.value)
    .values(updated_at=bindparam("b_now"))
    .returning(*JOB_COLUMNS)
)

_TRANSITIONS: dict[tuple[object, ...], Update] = {}


def _transition_statement(change: Transition) -> Update:
    """The conditional UPDATE of a transition of this shape (target, conditions, columns), built once:
    only legal source states (or the one named), and the attempt and tenant if the change names them."""
    shape = (
        change.target,
        change.source,
        change.attempt is not None,
        change.tenant is not None,
        change.abandoned_after_s is not None,
        *sorted(change.values),
    )
    statement = _TRANSITIONS.get(shape)
    if statement is None:
        sources = sources_of(change.target)
        if change.source is not None:
            # A caller's mistake, not a stale row: no row could ever match, so say so rather than answer
            # STALE forever. Raised, not asserted, so that `python -O` keeps the check.
            if change.source not in sources:
                raise IllegalTransition(change.source, change.target)
            sources = frozenset({change.source})
        conditions = [JOBS.c.id == bindparam("b_job_id"), _in_states(sources)]
        if change.attempt is not None:
            conditions.append(JOBS.c.attempts == bindparam("b_attempt"))
        if change.tenant is not None:
            conditions.append(JOBS.c.tenant == bindparam("b_tenant"))
        if change.abandoned_after_s is not None:
            conditions.append(attempt_abandoned(bindparam("b_now"), bindparam("b_dead_before")))
        columns = {name: bindparam(f"set_{name}", type_=JOBS.c[name].type) for name in change.values}
        statement = (
            update(JOBS)
            .where(*conditions)
            .values(
                status=change.target.value,
                last_seq=JOBS.c.last_seq + 1,
                updated_at=bindparam("b_now"),
                **columns,
            )
            .returning(*JOB_COLUMNS)
        )
        _TRANSITIONS[shape] = statement
    return statement


def read_jobs(connection: Connection, job_ids: Sequence[str], tenant: str | None = None) -> list[JobRecord]:
    """The jobs with these ids (of `tenant`, when given), in no particular order."""
    if not job_ids:
        return []
    query = select(*JOB_COLUMNS).where(JOBS.c.id.in_(list(job_ids)))
    if tenant is not None:
        query = query.where(JOBS.c.tenant == tenant)
    return [JobRecord.from_row(row) for row in connection.execute(query)]


def _columns(record: JobRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in JobRecord.__slots__}
