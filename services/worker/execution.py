"""Running one claimed job: its handler, then its outcome handed to the committer.

The worker claims jobs in batches (`runner.py`); each claimed job then runs here. Its outcome (and any
progress) is a change written by the process's committer in the next batch, with the other jobs'
outcomes and claims, and announced through the outbox in the same transaction. The handler's slot is
free again as soon as the handler has ended, before its outcome is committed; the job is still this
worker's (its lease is renewed) until the outcome is, and only then is its Kafka offset released.

The handler runs as a task of its own while the executor watches for the ways an attempt ends early.
Each sets `ctx.cancelled`, which a handler should check to stop soon:

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
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic_core import to_jsonable_python

from conveyor import changes
from conveyor.changes import TIMED_OUT, Change
from conveyor.committer import Committer
from conveyor.handlers import JobContext, JobType, Registry, run_handler
from conveyor.models import JobRecord
from conveyor.retries import Backoff
from conveyor.settings import DEFAULT_CANCEL_GRACE_S, DEFAULT_RETRY_BASE_S, DEFAULT_RETRY_CAP_S
from services.worker.reporting import ProgressWriter

log = structlog.get_logger(__name__)

# How much of a traceback an error record keeps: enough to debug, small enough for the row.
MAX_TRACEBACK_CHARS = 4000
# How long an interrupted handler's cleanup (its `finally` blocks) may take before the executor stops
# waiting for it; a handler that swallows the cancellation is abandoned then.
INTERRUPT_WAIT_S = 5.0
# An outcome the database did not take is written again after this long, doubling up to the cap,
# for as long as the attempt still holds its lease.
RECORD_RETRY_BASE_S = 0.5
RECORD_RETRY_CAP_S = 10.0

HandlerTask = asyncio.Task[Any]
DEFAULT_BACKOFF = Backoff(base_s=DEFAULT_RETRY_BASE_S, cap_s=DEFAULT_RETRY_CAP_S)


class Ending(enum.Enum):
    """How the wait for a handler ended."""

    RETURNED = "returned"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    HANDED_BACK = "handed_back"
    LOST = "lost"


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
    # Resolved by whichever of the three comes first: what the wait for the handler watches.
    interrupted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # When the lease was last renewed (the event loop's clock); the claim counts as the first renewal.
    renewed_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def cancel(self) -> None:
        """The job was canceled: tell the handler through `ctx.cancelled` and start its grace period."""
        self.canceled.set()
        self.context.cancelled.set()
        self._interrupt()

    def lose(self) -> None:
        """The lease is gone: stop the handler now, before the job's next attempt can start elsewhere."""
        self.lost.set()
        self.context.cancelled.set()
        self._interrupt()

    def hand_back(self) -> None:
        """The drain's grace is over: stop the handler and give the job back."""
        self.handing_back.set()
        self._interrupt()

    def _interrupt(self) -> None:
        if not self.interrupted.done():
            self.interrupted.set_result(None)


class JobExecutor:
    def __init__(
        self,
        *,
        committer: Committer,
        registry: Registry,
        worker_id: str,
        lease_s: float,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._committer = committer
        self._registry = registry
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._cancel_grace_s = cancel_grace_s
        self._backoff = backoff
        # The attempts this worker holds: claimed, and their outcome not yet committed.
        self.running: dict[str, Execution] = {}
        # How many of them still have their handler running: the slots in use.
        self.busy = 0
        # Set whenever a handler ends, so the worker loop can fill the slot.
        self.slot_freed = asyncio.Event()
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
            execution.hand_back()

    async def execute(self, job: JobRecord) -> None:
        """Run a claimed job to its recorded outcome."""
        progress = ProgressWriter(job.id, lambda percent, text: self._report(job, percent, text))

        async def report(percent: float | None, text: str | None) -> None:
            progress.report(percent, text)

        context = JobContext(
            job_id=job.id, tenant=job.tenant, type=job.type, attempt=job.attempts, report=report
        )
        execution = Execution(job.id, job.attempts, context)
        if self.draining:  # claimed while the worker stops: it should not start at all
            execution.hand_back()
        self.running[job.id] = execution
        self.busy += 1
        try:
            try:
                outcome = await self._run(job, execution, progress)
            finally:
                self.busy -= 1
                self.slot_freed.set()
            if outcome is not None:
                await self._record(job, outcome, execution)
        finally:
            self.running.pop(job.id, None)

    async def _run(self, job: JobRecord, execution: Execution, progress: ProgressWriter) -> Change | None:
        """Run the handler; the change that records how the attempt ended, if any."""
        try:
            job_type = self._registry.get(job.type)
            payload = job_type.validate_payload(job.payload)
        except Exception as exc:  # an unknown type, or a payload the type's model no longer accepts
            return self._failure(job, exc, None)
        timeout_s = job.timeout_s if job.timeout_s is not None else job_type.timeout_s
        log.debug("job.started", job_id=job.id, type=job.type, attempt=job.attempts, timeout_s=timeout_s)
        handler = asyncio.create_task(
            run_handler(job_type, execution.context, payload), name=f"handler-{job.id}"
        )
        handler.add_done_callback(_retrieve_exception)
        try:
            ending = await self._wait(handler, execution, timeout_s)
            if ending is Ending.CANCELED:
                await self._stop_canceled(job, handler)
                await progress.flush()
                return None
            if ending is Ending.TIMED_OUT:
                assert timeout_s is not None
                await self._stop_timed_out(job, execution, handler, timeout_s)
                await progress.flush()
                return self._timed_out(job, job_type, timeout_s)
            if ending is Ending.LOST:
                log.warning("job.abandoned", job_id=job.id, attempt=job.attempts, reason="lease lost")
                await _interrupt(handler)
                return None
            if ending is Ending.HANDED_BACK:
                log.warning("job.interrupted", job_id=job.id, attempt=job.attempts, reason="drain")
                await _interrupt(handler)
                await progress.flush()
                return self._hand_back(job)
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
                return self._hand_back(job)
            return self._failure(job, exc, job_type)
        return changes.complete(job, result)

    async def _wait(self, handler: HandlerTask, execution: Execution, timeout_s: float | None) -> Ending:
        """Wait until the handler returns, the job is canceled, the attempt's time is up, or the
        draining worker hands the job back."""
        await asyncio.wait(
            {handler, execution.interrupted}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        # A cancel wins over a handler that returned at the same moment: the job is canceled either way.
        if execution.canceled.is_set():
            return Ending.CANCELED
        if handler.done():  # recorded only if the lease is still this attempt's: the write is fenced
            return Ending.RETURNED
        if execution.lost.is_set():
            return Ending.LOST
        return Ending.HANDED_BACK if execution.handing_back.is_set() else Ending.TIMED_OUT

    async def _stop_canceled(self, job: JobRecord, handler: HandlerTask) -> None:
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
        self, job: JobRecord, execution: Execution, handler: HandlerTask, timeout_s: float
    ) -> None:
        """A timed-out attempt is stopped at once: no grace, its time is up."""
        log.warning("job.timed_out", job_id=job.id, attempt=job.attempts, timeout_s=timeout_s)
        execution.context.cancelled.set()
        await _interrupt(handler)

    async def _report(self, job: JobRecord, percent: float | None, text: str | None) -> None:
        await self._committer.apply([changes.progress(job.id, job.attempts, percent, text)])

    async def _record(self, job: JobRecord, change: Change, execution: Execution) -> None:
        """Write the attempt's outcome; while the database does not take it, try again for as long as the
        attempt holds its lease (a lease given up means the reaper will requeue the job instead)."""
        failures = 0
        while True:
            try:
                [result] = await self._committer.apply([change])
                break
            except Exception as exc:
                failures += 1
                if execution.lost.is_set() or (failures > 1 and self.draining):
                    log.warning("job.outcome_not_recorded", job_id=job.id, error=str(exc))
                    return
                log.warning("job.record_failed", job_id=job.id, failures=failures, error=str(exc))
                await asyncio.sleep(min(RECORD_RETRY_CAP_S, RECORD_RETRY_BASE_S * 2 ** min(failures, 6)))
        if not result.written:
            # Another worker took the job over (our lease expired) or it was canceled: our outcome is void.
            log.warning("job.outcome_rejected", job_id=job.id)
            return
        assert result.job is not None
        log.debug("job.recorded", job_id=job.id, status=result.job.status, attempt=result.job.attempts)

    def _timed_out(self, job: JobRecord, job_type: JobType, timeout_s: float) -> Change:
        error = {
            "type": TIMED_OUT,
            "message": f"the attempt ran longer than its timeout of {timeout_s:g} s",
            "attempt": job.attempts,
        }
        return self._attempt_failed(job, job_type, error)

    def _failure(self, job: JobRecord, exc: BaseException, job_type: JobType | None) -> Change:
        log.warning("job.attempt_failed", job_id=job.id, attempt=job.attempts, error=repr(exc))
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "attempt": job.attempts,
            "traceback": "".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        }
        return self._attempt_failed(job, job_type, error)

    def _attempt_failed(self, job: JobRecord, job_type: JobType | None, error: dict[str, Any]) -> Change:
        """Fail the attempt; with attempts left, the retry waits out the type's backoff."""
        retry_at = self._backoff_for(job_type).retry_at(job.attempts)
        return changes.fail_attempt(job, error, retry_at)

    def _backoff_for(self, job_type: JobType | None) -> Backoff:
        if job_type is None:
            return self._backoff
        return Backoff(
            base_s=self._backoff.base_s if job_type.retry_base_s is None else job_type.retry_base_s,
            cap_s=self._backoff.cap_s if job_type.retry_cap_s is None else job_type.retry_cap_s,
        )

    def _hand_back(self, job: JobRecord) -> Change:
        log.info("job.handed_back", job_id=job.id, attempt=job.attempts)
        return changes.hand_back(job, self.worker_id)


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
