"""Running one claimed job: its handler, then its outcome handed to the committer.

The worker claims jobs in batches (`runner.py`); each claimed job then runs here. Its outcome (and any
progress) is a change written by the process's committer in the next batch, with the other jobs'
outcomes and claims, and announced through the outbox in the same transaction. The handler's slot is
free again as soon as the handler has ended, before its outcome is committed; the job is still this
worker's (its lease is renewed) until the outcome is, and only then is its Kafka offset released.

The handler runs as a task of its own while the executor waits for it to return or for the attempt to
end early. Each early ending sets `ctx.cancelled`, which a handler should check to stop soon, and each
is one policy's to handle (`middleware/`): the time limit ran out (`time_limit`), the job was canceled
(`cancellation`), the lease was lost or given up (`leases`), the draining worker's grace is over
(`drain`). A handler that raised is a failure (`drain`, then `retries`).

The executor is the only writer of its attempts' state: the lease keeper and the cancel watch ask it
(`renewed`, `lose`, `cancel`), the worker's drain too (`drain`, `hand_back_all`).

Interrupting means cancelling the handler's task. A plain function running in a thread cannot be
interrupted: the executor stops waiting for it, and the thread runs on until the function returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import structlog
from opentelemetry import trace
from pydantic_core import to_jsonable_python

from conveyor import changes
from conveyor.background import exponential_delay
from conveyor.changes import Change
from conveyor.handlers import JobContext, run_handler
from conveyor.jsoncodec import encoded
from conveyor.models import JobRecord
from conveyor.retries import Backoff
from conveyor.sizes import MAX_PROGRESS_MESSAGE_CHARS, ResultTooLarge, truncated
from services.worker.attempt import Ending, Execution, HandlerTask
from services.worker.context import WorkerContext
from services.worker.middleware import Middleware
from services.worker.middleware.cancellation import Cancellation
from services.worker.middleware.drain import Drain
from services.worker.middleware.leases import LostLease
from services.worker.middleware.metrics import Metrics
from services.worker.middleware.retries import Retries
from services.worker.middleware.time_limit import TimeLimit, limit_for
from services.worker.reporting import ProgressWriter
from services.worker.spans import JobSpans

log = structlog.get_logger(__name__)

# An outcome the database did not take is written again after this long, doubling up to the cap,
# for as long as the attempt still holds its lease.
RECORD_RETRY_BASE_S = 0.5
RECORD_RETRY_CAP_S = 10.0


class JobExecutor:
    def __init__(self, context: WorkerContext) -> None:
        settings = context.settings
        self._committer = context.committer
        self._registry = context.registry
        self.worker_id = context.worker_id
        self._drain = Drain(context.worker_id)
        self._max_result_bytes = settings.max_result_bytes
        retries = Retries(
            Backoff(base_s=settings.retry_base_s, cap_s=settings.retry_cap_s), settings.expose_tracebacks
        )
        # In the order their hooks are called; `on_failure` is answered by the first that answers.
        self.middleware: list[Middleware] = [
            self._drain,
            retries,
            TimeLimit(retries),
            Cancellation(settings.cancel_grace_s),
            LostLease(),
            Metrics(),
        ]
        self._stops = {policy.ending: policy for policy in self.middleware if policy.ending is not None}
        if missing := set(Ending) - {Ending.RETURNED} - self._stops.keys():
            raise ValueError(f"no policy stops an attempt that ended {sorted(e.value for e in missing)}")
        # The attempts this worker holds: claimed, and their outcome not yet committed.
        self._running: dict[str, Execution] = {}
        # How many of them still have their handler running: the slots in use.
        self.busy = 0
        # Set whenever a handler ends, so the worker loop can fill the slot.
        self.slot_freed = asyncio.Event()

    # --- what the rest of the worker asks ---------------------------------------------------------------

    @property
    def running(self) -> Mapping[str, Execution]:
        return self._running

    @property
    def attempts(self) -> dict[str, int]:
        """The attempt number of each job running here."""
        return {job_id: execution.attempt for job_id, execution in self._running.items()}

    @property
    def draining(self) -> bool:
        return self._drain.draining

    def holds(self, job_id: str, attempt: int) -> bool:
        """Whether that attempt of the job runs here."""
        return self._attempt(job_id, attempt) is not None

    def renewed(self, job_id: str, attempt: int, at: float) -> None:
        """The attempt's lease was renewed, counting from `at` (the event loop's clock)."""
        execution = self._attempt(job_id, attempt)
        if execution is not None:
            execution.renewed_at = max(execution.renewed_at, at)

    def lose(self, job_id: str, attempt: int) -> None:
        """The attempt's lease is gone: stop it at once, and record nothing."""
        execution = self._attempt(job_id, attempt)
        if execution is not None:
            execution.lose()

    def cancel(self, job_id: str) -> int | None:
        """The job is canceled: its handler's grace period starts. The attempt told, if it was not yet."""
        execution = self._running.get(job_id)
        if execution is None or execution.canceled.is_set():
            return None
        execution.cancel()
        return execution.attempt

    def drain(self) -> None:
        """The worker is stopping: tell every running handler (`ctx.cancelled`) so it can wrap up."""
        self._drain.begin()
        for execution in self._running.values():
            execution.context.cancelled.set()

    def hand_back_all(self) -> None:
        """The drain's grace is over: stop every attempt still running and hand its job back."""
        for execution in self._running.values():
            execution.hand_back()

    def _attempt(self, job_id: str, attempt: int) -> Execution | None:
        execution = self._running.get(job_id)
        return execution if execution is not None and execution.attempt == attempt else None

    # --- one attempt ------------------------------------------------------------------------------------

    async def execute(self, job: JobRecord, spans: JobSpans | None = None) -> None:
        """Run a claimed job to its recorded outcome (in `spans`, when tracing)."""
        execution = self._begin(job, spans)
        try:
            self.busy += 1
            try:
                outcome = await self._run(execution)
            finally:
                self.busy -= 1
                self.slot_freed.set()
            if outcome is not None:
                await self._record(execution, outcome)
        finally:
            self._running.pop(job.id, None)
            if spans is not None:
                spans.end()

    def _begin(self, job: JobRecord, spans: JobSpans | None) -> Execution:
        progress = ProgressWriter(job.id, lambda percent, text: self._report(job, percent, text, spans))

        async def report(percent: float | None, text: str | None) -> None:
            progress.report(percent, None if text is None else truncated(text, MAX_PROGRESS_MESSAGE_CHARS))

        context = JobContext(
            job_id=job.id, tenant=job.tenant, type=job.type, attempt=job.attempts, report=report
        )
        execution = Execution(job, context, progress, spans=spans)
        self._running[job.id] = execution
        for policy in self.middleware:
            policy.before_start(execution)
        return execution

    async def _run(self, execution: Execution) -> Change | None:
        """Run the handler; the change that records how the attempt ended, if any."""
        job = execution.job
        try:
            job_type = self._registry.get(job.type)
            payload = job_type.validate_payload(job.payload)
        except Exception as exc:  # an unknown type, or a payload the type's model no longer accepts
            self._after_attempt(execution, None)
            return self._failed(execution, exc)
        execution.job_type, execution.timeout_s = job_type, limit_for(job, job_type)
        log.debug(
            "job.started", job_id=job.id, type=job.type, attempt=job.attempts, timeout_s=execution.timeout_s
        )
        spans = execution.spans
        # The handler's task runs in its span (when tracing), so a handler's own spans nest in it.
        current = trace.use_span(spans.handler_started(job.type)) if spans else contextlib.nullcontext()
        with current:
            handler = asyncio.create_task(
                run_handler(job_type, execution.context, payload), name=f"handler-{job.id}"
            )
        handler.add_done_callback(_retrieve_exception)
        outcome: Change | None
        ending: Ending | None = None
        try:
            ending = await self._wait(handler, execution)
            if ending is Ending.RETURNED:
                outcome = await self._returned(execution, handler)
            else:
                outcome = await self._stops[ending].stop(execution, handler)
        finally:
            if not handler.done():  # this task itself was cancelled: the worker is stopping
                handler.cancel()
            if spans is not None:
                spans.handler_ended(ending.value if ending is not None else "interrupted")
        self._after_attempt(execution, ending)
        return outcome

    async def _wait(self, handler: HandlerTask, execution: Execution) -> Ending:
        """Wait until the handler returns, the job is canceled, the attempt's time is up, the lease is
        lost, or the draining worker hands the job back."""
        await asyncio.wait(
            {handler, execution.interrupted}, timeout=execution.timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        # A cancel wins over a handler that returned at the same moment: the job is canceled either way.
        if execution.canceled.is_set():
            return Ending.CANCELED
        if handler.done():  # recorded only if the lease is still this attempt's: the write is fenced
            return Ending.RETURNED
        if execution.lost.is_set():
            return Ending.LOST
        return Ending.HANDED_BACK if execution.handing_back.is_set() else Ending.TIMED_OUT

    async def _returned(self, execution: Execution, handler: HandlerTask) -> Change:
        # The last progress report is written before the outcome, so it never follows the terminal event.
        await execution.progress.flush()
        try:
            result = within_limit(to_jsonable_python(_outcome(handler)), self._max_result_bytes)
        except Exception as exc:  # the handler's failure, or a result that is not JSON or too large
            return self._failed(execution, exc)
        return changes.complete(execution.job, result)

    def _failed(self, execution: Execution, exc: BaseException) -> Change:
        for policy in self.middleware:
            if (change := policy.on_failure(execution, exc)) is not None:
                return change
        raise RuntimeError(f"no policy recorded the failed attempt of job {execution.job_id}") from exc

    def _after_attempt(self, execution: Execution, ending: Ending | None) -> None:
        for policy in self.middleware:
            policy.after_attempt(execution, ending)

    async def _report(
        self, job: JobRecord, percent: float | None, text: str | None, spans: JobSpans | None
    ) -> None:
        # Reports may come from the handler's thread or process: its span is named, not taken as current.
        trace_carrier = spans.handler_carrier if spans is not None else None
        await self._committer.apply(
            [changes.progress(job.id, job.attempts, percent, text)], trace=trace_carrier
        )

    async def _record(self, execution: Execution, change: Change) -> None:
        """Write the attempt's outcome; while the database does not take it, try again for as long as the
        attempt holds its lease (a lease given up means the reaper will requeue the job instead)."""
        spans = execution.spans
        if spans is None:
            await self._write_outcome(execution, change)
            return
        with trace.use_span(spans.record(), end_on_exit=True):
            await self._write_outcome(execution, change)

    async def _write_outcome(self, execution: Execution, change: Change) -> None:
        job_id = execution.job_id
        failures = 0
        while True:
            try:
                # In the record span when tracing: the outcome's messages carry its context.
                [result] = await self._committer.apply([change])
                break
            except Exception as exc:
                failures += 1
                if execution.lost.is_set() or (failures > 1 and self.draining):
                    log.warning("job.outcome_not_recorded", job_id=job_id, error=str(exc))
                    return
                log.warning("job.record_failed", job_id=job_id, failures=failures, error=str(exc))
                # One doubling ahead of the count: the first retry waits twice the base, as it always has.
                await asyncio.sleep(exponential_delay(failures + 1, RECORD_RETRY_BASE_S, RECORD_RETRY_CAP_S))
        if not result.written:
            # Another worker took the job over (our lease expired) or it was canceled: our outcome is void.
            log.warning("job.outcome_rejected", job_id=job_id)
            return
        if result.job is None:  # a written transition always comes back with its row
            raise RuntimeError(f"the outcome of job {job_id} was written but returned no row")
        log.debug("job.recorded", job_id=job_id, status=result.job.status, attempt=result.job.attempts)


def within_limit(result: Any, max_bytes: int) -> Any:
    """The result as JSON (`jsoncodec.encoded`: measured, and then stored as it is), or ResultTooLarge
    if it is over `max_bytes` (`CONVEYOR_MAX_RESULT_BYTES`): its `succeeded` event carries it to Kafka."""
    if result is None:
        return None
    document, size = encoded(result)
    if size > max_bytes:
        raise ResultTooLarge(size, max_bytes)
    return document


class HandlerCancelled(Exception):
    """A handler raised CancelledError of its own accord: its attempt failed."""


def _outcome(handler: HandlerTask) -> Any:
    """The finished handler's result, or its exception raised. A handler's own CancelledError becomes
    `HandlerCancelled`: re-raised as it is, it would look like the worker cancelling this task."""
    if handler.cancelled():
        raise HandlerCancelled("the handler raised CancelledError")
    return handler.result()


def _retrieve_exception(handler: HandlerTask) -> None:
    # A handler that was given up on (canceled, timed out) may still fail later; its exception is
    # expected then, so mark it retrieved rather than let asyncio log it as never retrieved.
    if not handler.cancelled():
        handler.exception()
