"""Handlers that run in a pool of processes, for CPU-bound work: `@job(..., process=True)`.

    @job("pdf.render", payload=RenderIn, process=True)
    def render(ctx: ProcessJobContext, payload: RenderIn) -> dict[str, int]:
        for page, total in pages(payload):
            if ctx.cancelled.is_set():
                raise RenderStopped("told to stop")
            ctx.progress(done=page, total=total)  # synchronous here
        return {"pages": total}

A thread cannot run Python code in parallel with the worker's event loop (the GIL); a child process
can. The handler must be a plain, module-level function: the child imports it by name. Its payload
and return value cross to the child and back by pickle; the return value is converted to its JSON form
in the child, so a result that is not JSON fails there, with its traceback.

The pool is a `ProcessPoolExecutor` whose children are started with "spawn": fork would copy the
worker's event loop and threads in whatever state they are in. A `multiprocessing` manager, started
with the pool, connects each job's child to the worker: one queue carries every child's progress
reports to a reader thread, which hands them to the job's real `JobContext.progress`, and one event
per job carries `ctx.cancelled` to the child.

The child sees `ctx.cancelled` within about CANCEL_CHECK_INTERVAL_S of the worker setting it (a
cancel, a timeout, a drain). But a pool cannot stop one of its tasks: when the worker gives up on an
attempt (canceled past its grace, timed out, the worker stopping), it stops waiting and sets the
child's flag if it was not set yet; a task still waiting for a free process never starts, but a
running child runs its function to the end, holding one of the pool's processes, and its outcome and
late reports are dropped. `shutdown()` terminates the children still busy after a short wait.

Time spent waiting for a free process counts against the attempt's timeout. A child that dies
(killed, out of memory) breaks the executor: every job in it fails its attempt with
`BrokenProcessPool`, and the next job gets a new executor. The children and the manager exit within
about PARENT_CHECK_INTERVAL_S of the worker's own death, even by SIGKILL, rather than run on as orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.managers import SyncManager
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog
from pydantic_core import to_jsonable_python

from conveyor.logs import configure_logging

if TYPE_CHECKING:
    from conveyor.handlers import JobContext, JobType
    from conveyor.settings import Settings

log = structlog.get_logger(__name__)

START_METHOD = "spawn"
# How stale a child's view of `ctx.cancelled` may be: a loop may check it on every iteration, since
# the worker is asked at most this often.
CANCEL_CHECK_INTERVAL_S = 0.1
# A child that returned has sent all its reports; this is how long they may take to be passed on.
REPORTS_WAIT_S = 5.0
# `shutdown()`: how long busy children get to finish (they were told to stop when the worker drained),
# and how long a terminated one gets before it is killed.
SHUTDOWN_WAIT_S = 5.0
KILL_WAIT_S = 1.0
# How often a child checks that the worker is still alive, so it does not run on as an orphan.
PARENT_CHECK_INTERVAL_S = 1.0


class ProcessHandlerError(RuntimeError):
    """A process handler raised an exception that cannot be pickled back to the worker; this carries
    its type and message instead (the child's traceback is in its cause)."""


class Report(NamedTuple):
    """One `ctx.progress` call in a child, as `JobContext.progress` takes it."""

    percent: float | None
    message: str | None
    done: float | None
    total: float | None


# What the children send to the worker: (the job's token, a report, or None once the function has
# returned or raised). A bare None tells the reader thread to stop.
Message = tuple[str, Report | None]


@dataclass(frozen=True)
class ChildJob:
    """What a child needs for its context: the job, and the manager's proxies that link it to the worker."""

    token: str
    job_id: str
    tenant: str
    type: str
    attempt: int
    messages: queue.Queue[Message | None]
    cancelled: threading.Event


class CancelFlag:
    """`ctx.cancelled` in a child. `is_set()` asks the worker at most every CANCEL_CHECK_INTERVAL_S,
    so it is cheap enough for every iteration of a loop."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event
        self._set = False
        self._checked_at = float("-inf")

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked_at >= CANCEL_CHECK_INTERVAL_S:
            self._checked_at = now
            self._set = self._event.is_set()
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the job is told to stop or `timeout` passes; True if it was told to stop."""
        self._set = self._set or self._event.wait(timeout)
        return self._set


class ProcessJobContext:
    """What a process handler gets: `JobContext`'s fields, a synchronous `progress`, and `cancelled`
    with `is_set()` and `wait(timeout)`."""

    def __init__(self, job: ChildJob) -> None:
        self.job_id = job.job_id
        self.tenant = job.tenant
        self.type = job.type
        self.attempt = job.attempt
        self.cancelled = CancelFlag(job.cancelled)
        self.log = structlog.get_logger("conveyor.job").bind(
            job_id=job.job_id, type=job.type, attempt=job.attempt, pid=os.getpid()
        )
        self._job = job

    def progress(
        self,
        percent: float | None = None,
        message: str | None = None,
        *,
        done: float | None = None,
        total: float | None = None,
    ) -> None:
        """Report progress as `JobContext.progress` does; each call is a round trip to the worker."""
        self._job.messages.put((self._job.token, Report(percent, message, done, total)))


@dataclass
class _Started:
    manager: SyncManager
    messages: queue.Queue[Message | None]
    reader: threading.Thread
    executor: ProcessPoolExecutor


class _Inbox(NamedTuple):
    """Where the reader thread puts one running job's reports: a queue of the job's event loop."""

    loop: asyncio.AbstractEventLoop
    reports: asyncio.Queue[Report | None]


class ProcessPool:
    """Runs process handlers in up to `max_workers` children, started with the first job."""

    def __init__(
        self, max_workers: int | None = None, *, log_level: str = "INFO", log_json: bool = False
    ) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self._log_options = (log_level, log_json)
        self._lock = threading.Lock()
        self._started: _Started | None = None
        # By job token; read by the reader thread (single dict operations, atomic under the GIL).
        self._inboxes: dict[str, _Inbox] = {}

    async def run(self, job_type: JobType, ctx: JobContext, payload: Any) -> Any:
        """Run the handler in a child and return its result (in JSON form), or raise its exception.

        Cancelling the calling task stops the wait, not the child: see the module's docstring."""
        started, job = await asyncio.to_thread(self._prepare, ctx)
        inbox = _Inbox(asyncio.get_running_loop(), asyncio.Queue())
        self._inboxes[job.token] = inbox
        relay = asyncio.create_task(_relay_reports(ctx, inbox.reports), name=f"reports-{ctx.job_id}")
        watch = asyncio.create_task(_pass_on_cancel(ctx, job.cancelled), name=f"cancel-{ctx.job_id}")
        executor = started.executor
        try:
            future = executor.submit(_run_in_child, job_type.handler, job, payload)
            try:
                return await asyncio.wrap_future(future)
            finally:
                if _child_finished(future):
                    # Its last reports are written before its outcome, as for any handler.
                    await asyncio.wait({relay}, timeout=REPORTS_WAIT_S)
        except BrokenProcessPool:
            self._replace_broken(started, executor)
            raise
        except asyncio.CancelledError:
            # Given up on: the child must stop too, even if `ctx.cancelled` was never set. Not awaited
            # (this task is being cancelled); suppressed if the loop's threads are already gone.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().run_in_executor(None, _set_quietly, job.cancelled)
            raise
        finally:
            self._inboxes.pop(job.token, None)
            relay.cancel()
            watch.cancel()

    def shutdown(self, wait_s: float = SHUTDOWN_WAIT_S) -> None:
        """Stop the children (those still busy after `wait_s` are terminated), the reader and the
        manager. Blocks: from async code, run it in a thread. The next job starts the pool again."""
        with self._lock:
            started, self._started = self._started, None
        if started is None:
            return
        children = list(started.executor._processes.values())  # private, but the only way to them
        started.executor.shutdown(wait=False, cancel_futures=True)
        busy = _wait_for_exit(children, wait_s)
        if busy:
            log.warning("processes.terminating", pids=[child.pid for child in busy], waited_s=wait_s)
            for child in busy:
                child.terminate()
            for child in _wait_for_exit(busy, KILL_WAIT_S):
                child.kill()
        _put_quietly(started.messages, None)
        started.reader.join(timeout=KILL_WAIT_S)
        started.manager.shutdown()
        log.info("processes.stopped", children=len(children))

    def _prepare(self, ctx: JobContext) -> tuple[_Started, ChildJob]:
        """The pool, started if need be, and the job as the child will see it (in a thread: both talk
        to the manager)."""
        started = self._start()
        job = ChildJob(
            token=uuid.uuid4().hex,
            job_id=ctx.job_id,
            tenant=ctx.tenant,
            type=ctx.type,
            attempt=ctx.attempt,
            messages=started.messages,
            cancelled=started.manager.Event(),
        )
        return started, job

    def _start(self) -> _Started:
        with self._lock:
            if self._started is None:
                context = multiprocessing.get_context(START_METHOD)
                manager = SyncManager(ctx=context)
                manager.start(_init_helper_process, (os.getpid(),))
                messages: queue.Queue[Message | None] = manager.Queue()
                reader = threading.Thread(
                    target=self._read_messages, args=(messages,), name="process-reports", daemon=True
                )
                reader.start()
                self._started = _Started(manager, messages, reader, self._new_executor())
                log.info("processes.started", max_workers=self.max_workers, start_method=START_METHOD)
            return self._started

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.max_workers,
            mp_context=multiprocessing.get_context(START_METHOD),
            initializer=_init_child,
            initargs=(os.getpid(), *self._log_options),
        )

    def _replace_broken(self, started: _Started, executor: ProcessPoolExecutor) -> None:
        """A child died (killed, out of memory, crashed): the executor fails every job it holds and
        refuses new ones, so the next job gets a new one."""
        with self._lock:
            if started.executor is executor:
                log.warning("processes.pool_broken")
                started.executor = self._new_executor()

    def _read_messages(self, messages: queue.Queue[Message | None]) -> None:
        while True:
            try:
                message = messages.get()
            except (OSError, EOFError):  # the manager is gone: the pool is stopping
                return
            if message is None:
                return
            token, report = message
            inbox = self._inboxes.get(token)
            if inbox is None:
                continue  # the job was given up on: its late reports go nowhere
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                inbox.loop.call_soon_threadsafe(inbox.reports.put_nowait, report)


async def _relay_reports(ctx: JobContext, reports: asyncio.Queue[Report | None]) -> None:
    """Pass a child's reports to the job's real context, in order, until the child has finished."""
    while (report := await reports.get()) is not None:
        await ctx.progress(report.percent, report.message, done=report.done, total=report.total)


async def _pass_on_cancel(ctx: JobContext, cancelled: threading.Event) -> None:
    await ctx.cancelled.wait()
    await asyncio.to_thread(_set_quietly, cancelled)


def _child_finished(future: Future[Any]) -> bool:
    """True when the child ran the function to its end (it returned or raised), so that the reports
    it sent are all on their way, followed by its end marker."""
    if not future.done() or future.cancelled():
        return False
    return not isinstance(future.exception(), BrokenProcessPool)


def _set_quietly(event: threading.Event) -> None:
    # The manager may be gone (the pool is stopping), and with it the child's view of the flag.
    with contextlib.suppress(OSError, EOFError):
        event.set()


def _put_quietly(messages: queue.Queue[Message | None], message: Message | None) -> None:
    with contextlib.suppress(OSError, EOFError):
        messages.put(message)


def _wait_for_exit(children: Sequence[BaseProcess], timeout_s: float) -> list[BaseProcess]:
    """The children still running after waiting up to `timeout_s` for them to exit."""
    deadline = time.monotonic() + timeout_s
    running = {child.sentinel: child for child in children}
    while running and (remaining := deadline - time.monotonic()) > 0:
        exited = wait(list(running), remaining)
        running = {sentinel: child for sentinel, child in running.items() if sentinel not in exited}
    return list(running.values())


# In the children.


def _run_in_child(handler: Callable[[ProcessJobContext, Any], Any], job: ChildJob, payload: Any) -> Any:
    ctx = ProcessJobContext(job)
    try:
        return to_jsonable_python(handler(ctx, payload))
    except Exception as exc:
        if _round_trips(exc):
            raise
        # The worker could not unpickle it, and that would break the whole pool.
        raise ProcessHandlerError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        _put_quietly(job.messages, (job.token, None))


def _round_trips(exc: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return False
    return True


def _init_child(parent_pid: int, log_level: str, log_json: bool) -> None:
    _init_helper_process(parent_pid)
    configure_logging(log_level, log_json)


def _init_helper_process(parent_pid: int) -> None:
    # The worker decides when its children stop (it drains, then shuts the pool down): a Ctrl-C sent to
    # the whole process group must not kill them mid-job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with(parent_pid)


def _exit_with(parent_pid: int) -> None:
    """End this process soon after the worker dies, even by SIGKILL, instead of running on as an orphan."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# The worker's pool, sized by `configure`; `run_handler` runs process handlers here.
_default_pool = ProcessPool()


def configure(settings: Settings) -> ProcessPool:
    """Size the worker's pool (`worker_processes`) and its children's logging; before the first job."""
    global _default_pool
    _default_pool.shutdown()
    _default_pool = ProcessPool(
        settings.worker_processes, log_level=settings.log_level, log_json=settings.log_json
    )
    return _default_pool


def default_pool() -> ProcessPool:
    return _default_pool


def shutdown() -> None:
    """Stop the worker's pool, if it was started (blocks for up to SHUTDOWN_WAIT_S)."""
    _default_pool.shutdown()


__all__ = [
    "CancelFlag",
    "ProcessHandlerError",
    "ProcessJobContext",
    "ProcessPool",
    "configure",
    "default_pool",
    "shutdown",
]
