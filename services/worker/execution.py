"""Running one job: claim it in the database, run its handler, record the outcome, announce each change.

Each step is a short transaction that changes the job and stages its event in the outbox; the event is
then published before the next step, so a job's events reach Kafka in order.
"""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.database import Database
from conveyor.events import JobMessage
from conveyor.handlers import JobContext, Registry, run_handler
from conveyor.jobstore import announce, announce_state, claim_job, complete_job, fail_attempt, record_progress
from conveyor.models import Job, OutboxMessage
from conveyor.outbox import OutboxRelay
from services.worker.reporting import ProgressWriter

log = structlog.get_logger(__name__)

# How much of a traceback an error record keeps: enough to debug, small enough for the row.
MAX_TRACEBACK_CHARS = 4000


@dataclass
class Execution:
    job_id: str
    attempt: int
    context: JobContext


class JobExecutor:
    def __init__(
        self,
        *,
        db: Database,
        relay: OutboxRelay,
        registry: Registry,
        prefix: str,
        worker_id: str,
        lease_s: float,
    ) -> None:
        self._db = db
        self._relay = relay
        self._registry = registry
        self._prefix = prefix
        self.worker_id = worker_id
        self._lease_s = lease_s
        self.running: dict[str, Execution] = {}

    async def execute(self, message: JobMessage) -> None:
        job = await self._claim(message.job_id)
        if job is None:
            log.info("job.skipped", job_id=message.job_id, reason="not claimable")
            return
        progress = ProgressWriter(job.id, lambda percent, text: self._report(job, percent, text))

        async def report(percent: float | None, text: str | None) -> None:
            progress.report(percent, text)

        context = JobContext(
            job_id=job.id, tenant=job.tenant, type=job.type, attempt=job.attempts, report=report
        )
        self.running[job.id] = Execution(job.id, job.attempts, context)
        try:
            await self._run(job, context, progress)
        finally:
            self.running.pop(job.id, None)

    async def _run(self, job: Job, context: JobContext, progress: ProgressWriter) -> None:
        log.info("job.started", job_id=job.id, type=job.type, attempt=job.attempts)
        try:
            job_type = self._registry.get(job.type)
            result = to_jsonable_python(
                await run_handler(job_type, context, job_type.validate_payload(job.payload))
            )
        except Exception as exc:  # the handler's failure, an unknown type, a result that is not JSON
            await progress.flush()
            await self._record_failure(job, exc)
            return
        # The last progress report is written before the outcome, so it never follows the terminal event.
        await progress.flush()
        await self._record(job.id, lambda session: complete_job(session, job.id, job.attempts, result))

    async def _claim(self, job_id: str) -> Job | None:
        async with self._db.session() as session:
            job = await claim_job(session, job_id, self.worker_id, self._lease_s)
            row = announce(session, self._prefix, job, "state") if job is not None else None
        if row is not None:
            await self._relay.publish([row])
        return job

    async def _report(self, job: Job, percent: float | None, text: str | None) -> None:
        async with self._db.session() as session:
            updated = await record_progress(session, job.id, job.attempts, percent, text)
            row = announce(session, self._prefix, updated, "progress") if updated is not None else None
        if row is not None:
            await self._relay.publish([row])

    async def _record(self, job_id: str, write: Callable[[AsyncSession], Awaitable[Job | None]]) -> None:
        rows: list[OutboxMessage] = []
        async with self._db.session() as session:
            updated = await write(session)
            if updated is not None:
                rows = announce_state(session, self._prefix, updated)
        if updated is None:
            # Another worker took the job over (our lease expired) or it was canceled: our outcome is void.
            log.warning("job.outcome_rejected", job_id=job_id)
            return
        log.info("job.recorded", job_id=job_id, status=updated.status, attempt=updated.attempts)
        await self._relay.publish(rows)

    async def _record_failure(self, job: Job, exc: BaseException) -> None:
        log.warning("job.attempt_failed", job_id=job.id, attempt=job.attempts, error=repr(exc))
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "attempt": job.attempts,
            "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        }
        await self._record(job.id, lambda session: fail_attempt(session, job, error))
