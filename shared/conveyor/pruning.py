"""Deleting rows once nobody needs them: finished jobs (`CONVEYOR_JOB_RETENTION_S`), with their events,
labels, idempotency keys and message positions; the event history of finished jobs
(`CONVEYOR_EVENT_HISTORY_S`); and expired idempotency keys.

Each step deletes at most `PRUNE_BATCH` rows (or jobs) in one short transaction, and the pruner runs
steps until one finds less than a batch, pausing between them. One unbounded DELETE of a backlog would
hold SQLite's write lock for longer than its busy timeout, and turn every submission meanwhile into a
503. Ages are measured by the database's clock. Several instances may prune at once: the deletes are
idempotent, so they need no coordination.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from datetime import timedelta

import structlog
from sqlalchemy import Connection, Table, delete, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from conveyor.background import BackgroundTask, run_every
from conveyor.clock import database_now
from conveyor.database import Database
from conveyor.lifecycle import TERMINAL_STATES
from conveyor.models import JOB_MESSAGE_POSITIONS, JOBS, IdempotencyKey, JobEventRecord, JobLabel

log = structlog.get_logger(__name__)

PRUNE_INTERVAL_S = 600.0
# Rows (or jobs, with theirs) one transaction deletes: a few milliseconds of the write lock.
PRUNE_BATCH = 500
# Between two batches, so that the other writers of the process and of other processes take turns.
PRUNE_PAUSE_S = 0.05

EVENTS: Table = JobEventRecord.__table__  # type: ignore[assignment]
LABELS: Table = JobLabel.__table__  # type: ignore[assignment]
KEYS: Table = IdempotencyKey.__table__  # type: ignore[assignment]
FINISHED = JOBS.c.status.in_(sorted(TERMINAL_STATES))

# Deletes at most `limit` rows (or jobs) that are no longer needed, in the given transaction; how many.
PruneStep = Callable[[Connection, int], int]


def prune_finished_jobs(connection: Connection, limit: int, keep_s: float) -> int:
    """Delete up to `limit` jobs that finished more than `keep_s` ago, with their events, labels,
    idempotency keys (a key outliving its job would answer with a job that is gone) and message
    positions."""
    finished_before = database_now(connection) - timedelta(seconds=keep_s)
    ids = list(
        connection.execute(
            select(JOBS.c.id).where(JOBS.c.finished_at < finished_before, FINISHED).limit(limit)
        ).scalars()
    )
    if not ids:
        return 0
    connection.execute(delete(EVENTS).where(EVENTS.c.job_id.in_(ids)))
    connection.execute(delete(LABELS).where(LABELS.c.job_id.in_(ids)))
    connection.execute(delete(KEYS).where(KEYS.c.job_id.in_(ids)))
    connection.execute(delete(JOB_MESSAGE_POSITIONS).where(JOB_MESSAGE_POSITIONS.c.job_id.in_(ids)))
    connection.execute(delete(JOBS).where(JOBS.c.id.in_(ids)))
    return len(ids)


def prune_event_history(connection: Connection, limit: int, keep_s: float) -> int:
    """Delete the events of up to `limit` jobs that finished more than `keep_s` ago; how many jobs."""
    finished_before = database_now(connection) - timedelta(seconds=keep_s)
    with_history = (
        select(EVENTS.c.job_id)
        .join(JOBS, JOBS.c.id == EVENTS.c.job_id)
        .where(JOBS.c.finished_at < finished_before, FINISHED)
        .distinct()
        .limit(limit)
    )
    ids = list(connection.execute(with_history).scalars())
    if ids:
        connection.execute(delete(EVENTS).where(EVENTS.c.job_id.in_(ids)))
    return len(ids)


def prune_keys(connection: Connection, limit: int) -> int:
    """Delete up to `limit` expired idempotency keys; how many."""
    expired = (
        select(KEYS.c.tenant, KEYS.c.key).where(KEYS.c.expires_at <= database_now(connection)).limit(limit)
    )
    pairs = [tuple(row) for row in connection.execute(expired)]
    if pairs:
        connection.execute(delete(KEYS).where(tuple_(KEYS.c.tenant, KEYS.c.key).in_(pairs)))
    return len(pairs)


def keep_for(step: Callable[..., int], keep_s: float) -> PruneStep:
    """`step` with its retention bound: what a `Pruner` runs."""
    return functools.partial(step, keep_s=keep_s)


class Pruner:
    def __init__(
        self,
        db: Database,
        name: str,
        step: PruneStep,
        interval_s: float = PRUNE_INTERVAL_S,
        batch: int = PRUNE_BATCH,
    ) -> None:
        self._db = db
        self._name = name
        self._step = step
        self._interval_s = interval_s
        self._batch = batch
        self._loop = BackgroundTask(f"pruner-{name}", self._run)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def prune_once(self) -> int:
        """Run the step, batch after batch, until a batch finds less than a whole batch; how many."""
        total = 0
        while True:
            deleted = await self._db.write(lambda connection: self._step(connection, self._batch))
            total += deleted
            if deleted < self._batch:
                return total
            await asyncio.sleep(PRUNE_PAUSE_S)

    async def _run(self) -> None:
        # A first round at once: a service that restarts often would otherwise never prune.
        await self._round()
        await run_every(self._interval_s, self._round, failure_event="prune.failed")

    async def _round(self) -> None:
        try:
            deleted = await self.prune_once()
        except (SQLAlchemyError, OSError) as exc:
            # The database is away: a warning, not a traceback; the next round tries again.
            log.warning("prune.failed", what=self._name, error=str(exc))
        else:
            if deleted:
                log.info("prune.done", what=self._name, rows=deleted)
