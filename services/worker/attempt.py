"""One attempt of a claimed job as the executor holds it: its state, the ways its handler's wait can end,
and how a handler is interrupted.

Only the executor (`execution.py`) and its policies (`middleware/`) change an `Execution`; the lease
keeper, the cancel watch and the worker loop ask the executor to (`JobExecutor.cancel`, `.lose`, ...).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any

import structlog

from conveyor.handlers import JobContext, JobType
from conveyor.models import JobRecord
from services.worker.reporting import ProgressWriter
from services.worker.spans import JobSpans

log = structlog.get_logger(__name__)

# How long an interrupted handler's cleanup (its `finally` blocks) may take before the executor stops
# waiting for it; a handler that swallows the cancellation is abandoned then.
INTERRUPT_WAIT_S = 5.0

HandlerTask = asyncio.Task[Any]


class Ending(enum.Enum):
    """How the wait for a handler ended."""

    RETURNED = "returned"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"
    HANDED_BACK = "handed_back"
    LOST = "lost"


@dataclass
class Execution:
    job: JobRecord
    context: JobContext
    progress: ProgressWriter
    # Known once the job's type is found and its payload accepted; None until then (or if not).
    job_type: JobType | None = None
    # The attempt's time limit (`middleware/time_limit.py`), once its type is known; None: no limit.
    timeout_s: float | None = None
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
    # When the attempt began here (the event loop's clock).
    began_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    # When the lease was last renewed (the event loop's clock); the claim counts as the first renewal.
    renewed_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    # The job's spans on this worker, when tracing (`spans.py`).
    spans: JobSpans | None = None

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempts

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


async def interrupt(handler: HandlerTask) -> None:
    """Cancel the handler's task and give its cleanup a moment. For a plain function the task ends at
    once while its thread runs on: a thread cannot be interrupted from outside."""
    handler.cancel()
    await asyncio.wait({handler}, timeout=INTERRUPT_WAIT_S)
    if not handler.done():
        log.warning("job.not_interrupted", task=handler.get_name(), waited_s=INTERRUPT_WAIT_S)
