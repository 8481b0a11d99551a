"""Running one job: claim it in the database, run its handler, record the outcome, announce each change.

Each step is a short transaction that changes the job and stages its event in the outbox; the event is
then published before the next step, so a job's events reach Kafka in order.

The handler runs as a task of its own while the executor watches for the three ways an attempt ends
early. Each sets `ctx.cancelled`, which a handler should check to stop soon:

- Its timeout (the job's `timeout_s`, else its type's) runs out: the handler is interrupted at once and
  the attempt fails with `timed_out`, to be retried like any failure.
- The job is canceled (the lease keeper sees it in the database): the handler gets `cancel_grace_s` to
  return by itself, then it is interrupted. Nothing is recorded, since the job is `canceled` already.
- The lease is lost (see `leases.py`): another worker may run the job's next attempt now, so the
  handler is interrupted at once and nothing is recorded. The lease keeper also gives up a lease it
  has failed to renew for most of its length, before another worker can see it expire: the same job
  never runs twice at once, even when this worker loses the database.
- The worker drains (SIGTERM): `ctx.cancelled` is set at once, and the handler has the drain's grace
  period to finish. A handler that returns is recorded as usual; one that stops by raising, or is still
  running when the grace ends (it is interrupted then), is handed back: queued again at once for
  another worker, without using up one of the job's attempts.

A failed attempt with attempts left is retried after a backoff (`conveyor.retries`): the job waits as
`scheduled` until its retry time, in the database, so the retry survives any restart.

Interrupting means cancelling the handler's task. A plain function running in a thread cannot be
interrupted: the executor stops waiting for it, and the thread runs on until the function returns.
"""

from __future__ import annotations

import asyncio
import enum
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.database import Database
from conveyor.events import JobMessage
from conveyor.handlers import JobContext, JobType, Registry, run_handler
from conveyor.jobstore import (
    TIMED_OUT,
    announce,
    announce_state,
    claim_job,
    complete_job,
    fail_attempt,
    hand_back_job,
    record_progress,
)
from conveyor.models import Job, OutboxMessage
from conveyor.outbox import OutboxRelay
from conveyor.retries import Backoff
from conveyor.settings import DEFAULT_CANCEL_GRACE_S, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_CAP_S
from services.worker.reporting import ProgressWriter

log = structlog.get_logger(__name__)

# How much of a traceback an error record keeps: enough to debug, small enough for the row.
MAX_TRACEBACK_CHARS = 4000
# How long an interrupted handler's cleanup (its `finally` blocks) may take before the executor stops
# waiting for it; a handler that swallows the cancellation is abandoned then.
INTERRUPT_WAIT_S = 5.0

HandlerTask = asyncio.Task[Any]
DEFAULT_BACKOFF = Backoff(base_s=DEFAULT_RETRY_BASE_S, cap_s=DEFAULT_RETRY_CAP_S)


@dataclass
class Execution:
    job_id: str
    attempt: int
    context: JobContext
    # Set once the job is seen canceled in the database: the handler's grace period starts.
    canceled: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when a draining worker's grace period is over: the attempt is stopped and handed back.
    handing_back: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the lease is lost or given up: the attempt is stopped, and records nothing.
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    # When the lease was last renewed (the event loop's clock); the claim counts as the first renewal.
    renewed_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def cancel(self) -> None:
        """The job was canceled: tell the handler through `ctx.cancelled` and start its grace period."""
        self.canceled.set()
        self.context.cancelled.set()

    def lose(self) -> None:
        """The lease is gone: stop the handler now, before the job's next attempt can start elsewhere."""
        self.lost.set()
        self.context.cancelled.set()


class Ending(enum.Enum):
    """How the wait for a handler ended."""

    RETURNED = "returned"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    HANDED_BACK = "handed_back"
    LOST = "lost"


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
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._db = db
        self._relay = relay
        self._registry = registry
        self._prefix = prefix
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._cancel_grace_s = cancel_grace_s
        self._backoff = backoff
        self.running: dict[str, Execution] = {}
        # Set by `drain`: from then on an attempt that does not return a result is handed back.
        self.draining = False

    def drain(self) -> None:
        """The worker is stopping: tell every running handler (`ctx.cancelled`) so it can wrap up."""
        self.draining = True
        for execution in self.running.values():
            execution.context.cancelled.set()

    def hand_back_all(self) -> None:
        """The drain's grace is over: stop every attempt still running and hand its job back."""
        for execution in self.running.values():
            execution.handing_back.set()

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
        execution = Execution(job.id, job.attempts, context)
        if self.draining:  # claimed while the worker stops: it should not start at all
            execution.handing_back.set()
        self.running[job.id] = execution
        try:
            await self._run(job, execution, progress)
        finally:
            self.running.pop(job.id, None)

    async def _run(self, job: Job, execution: Execution, progress: ProgressWriter) -> None:
        try:
            job_type = self._registry.get(job.type)
            payload = job_type.validate_payload(job.payload)
        except Exception as exc:  # an unknown type, or a payload the type's model no longer accepts
            await self._record_failure(job, exc, None)
            return
        timeout_s = job.timeout_s if job.timeout_s is not None else job_type.timeout_s
        log.info("job.started", job_id=job.id, type=job.type, attempt=job.attempts, timeout_s=timeout_s)
        handler = asyncio.create_task(
            run_handler(job_type, execution.context, payload), name=f"handler-{job.id}"
        )
        handler.add_done_callback(_retrieve_exception)
        try:
            ending = await self._wait(handler, execution, timeout_s)
            if ending is Ending.CANCELED:
                await self._stop_canceled(job, handler)
                await progress.flush()
                return
            if ending is Ending.TIMED_OUT:
                assert timeout_s is not None
                await self._stop_timed_out(job, execution, handler, timeout_s)
                await progress.flush()
                await self._record_timeout(job, job_type, timeout_s)
                return
            if ending is Ending.LOST:
                log.warning("job.abandoned", job_id=job.id, attempt=job.attempts, reason="lease lost")
                await _interrupt(handler)
                return
            if ending is Ending.HANDED_BACK:
                log.warning("job.interrupted", job_id=job.id, attempt=job.attempts, reason="drain")
                await _interrupt(handler)
                await progress.flush()
                await self._hand_back(job)
                return
        finally:
            if not handler.done():  # this task itself was cancelled: the worker is stopping
                handler.cancel()
        # The last progress report is written before the outcome, so it never follows the terminal event.
        await progress.flush()
        try:
            result = to_jsonable_python(_outcome(handler))
        except Exception as exc:  # the handler's failure, or a result that is not JSON
            if self.draining and execution.context.cancelled.is_set():
                # Most likely it stopped because the worker told it to: not the job's fault.
                await self._hand_back(job)
            else:
                await self._record_failure(job, exc, job_type)
            return
        await self._record(job.id, lambda session: complete_job(session, job.id, job.attempts, result))

    async def _wait(self, handler: HandlerTask, execution: Execution, timeout_s: float | None) -> Ending:
        """Wait until the handler returns, the job is canceled, the attempt's time is up, or the
        draining worker hands the job back."""
        watches = {
            asyncio.create_task(execution.canceled.wait(), name=f"cancel-watch-{execution.job_id}"),
            asyncio.create_task(execution.handing_back.wait(), name=f"drain-watch-{execution.job_id}"),
            asyncio.create_task(execution.lost.wait(), name=f"lease-watch-{execution.job_id}"),
        }
        try:
            await asyncio.wait({handler, *watches}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watch in watches:
                watch.cancel()
        # A cancel wins over a handler that returned at the same moment: the job is canceled either way.
        if execution.canceled.is_set():
            return Ending.CANCELED
        if handler.done():  # recorded only if the lease is still this attempt's: the write is fenced
            return Ending.RETURNED
        if execution.lost.is_set():
            return Ending.LOST
        return Ending.HANDED_BACK if execution.handing_back.is_set() else Ending.TIMED_OUT

    async def _stop_canceled(self, job: Job, handler: HandlerTask) -> None:
        """Give the handler its grace period to return by itself, then interrupt it."""
        loop = asyncio.get_running_loop()
        seen = loop.time()
        await asyncio.wait({handler}, timeout=self._cancel_grace_s)
        interrupted = not handler.done()
        if interrupted:
            log.warning("job.interrupted", job_id=job.id, attempt=job.attempts, grace_s=self._cancel_grace_s)
            await _interrupt(handler)
        log.info(
            "job.canceled",
            job_id=job.id,
            attempt=job.attempts,
            interrupted=interrupted,
            stopped_in_s=round(loop.time() - seen, 3),
        )

    async def _stop_timed_out(
        self, job: Job, execution: Execution, handler: HandlerTask, timeout_s: float
    ) -> None:
        """A timed-out attempt is stopped at once: no grace, its time is up."""
        log.warning("job.timed_out", job_id=job.id, attempt=job.attempts, timeout_s=timeout_s)
        execution.context.cancelled.set()
        await _interrupt(handler)

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
        if self.draining:
            # The outcome is committed with its messages; a stopping worker does not wait for Kafka,
            # which may be down. Its relay tries once more as it stops, and any relay sweeps up the rest.
            self._relay.notify(rows)
            return
        await self._relay.publish(rows)

    async def _record_timeout(self, job: Job, job_type: JobType, timeout_s: float) -> None:
        error = {
            "type": TIMED_OUT,
            "message": f"the attempt ran longer than its timeout of {timeout_s:g} s",
            "attempt": job.attempts,
        }
        await self._record_attempt_failed(job, job_type, error)

    async def _record_failure(self, job: Job, exc: BaseException, job_type: JobType | None) -> None:
        log.warning("job.attempt_failed", job_id=job.id, attempt=job.attempts, error=repr(exc))
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "attempt": job.attempts,
            "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        }
        await self._record_attempt_failed(job, job_type, error)

    async def _record_attempt_failed(self, job: Job, job_type: JobType | None, error: dict[str, Any]) -> None:
        """Fail the attempt; with attempts left, the retry waits out the type's backoff."""
        retry_at = self._backoff_for(job_type).retry_at(job.attempts)
        await self._record(job.id, lambda session: fail_attempt(session, job, error, retry_at))

    def _backoff_for(self, job_type: JobType | None) -> Backoff:
        if job_type is None:
            return self._backoff
        return Backoff(
            base_s=self._backoff.base_s if job_type.retry_base_s is None else job_type.retry_base_s,
            cap_s=self._backoff.cap_s if job_type.retry_cap_s is None else job_type.retry_cap_s,
        )

    async def _hand_back(self, job: Job) -> None:
        log.info("job.handed_back", job_id=job.id, attempt=job.attempts)
        await self._record(job.id, lambda session: hand_back_job(session, job, self.worker_id))


class HandlerCancelled(Exception):
    """A handler raised CancelledError of its own accord: its attempt failed."""


def _outcome(handler: HandlerTask) -> Any:
    """The finished handler's result, or its exception raised. A handler's own CancelledError becomes
    `HandlerCancelled`: re-raised as it is, it would look like the worker cancelling this task."""
    if handler.cancelled():
        raise HandlerCancelled("the handler raised CancelledError")
    return handler.result()


async def _interrupt(handler: HandlerTask) -> None:
    """Cancel the handler's task and give its cleanup a moment. For a plain function the task ends at
    once while its thread runs on: a thread cannot be interrupted from outside."""
    handler.cancel()
    await asyncio.wait({handler}, timeout=INTERRUPT_WAIT_S)
    if not handler.done():
        log.warning("job.not_interrupted", task=handler.get_name(), waited_s=INTERRUPT_WAIT_S)


def _retrieve_exception(handler: HandlerTask) -> None:
    # A handler that was given up on (canceled, timed out) may still fail later; its exception is
    # expected then, so mark it retrieved rather than let asyncio log it as never retrieved.
    if not handler.cancelled():
        handler.exception()
