"""Process handlers for tests/test_handlers_process.py. A child process imports a handler by its
module and name, so they live here, at the top level of a module on the tests' path."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conveyor.processes import ProcessJobContext

# However long a test waits, a handler that waits for it gives up after this (a stuck child must not
# outlive the test run by much).
GIVE_UP_S = 60.0


class Steps(BaseModel):
    steps: int


class Marker(BaseModel):
    """A file the handler creates once it sees `ctx.cancelled`, for tests whose wait has ended."""

    path: str


class Unpicklable(Exception):
    """Its constructor takes two arguments, but it pickles only its message: it cannot be unpickled."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")


def whoami(ctx: ProcessJobContext, payload: Any) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "job_id": ctx.job_id,
        "tenant": ctx.tenant,
        "type": ctx.type,
        "attempt": ctx.attempt,
        "payload": payload,
    }


def count(ctx: ProcessJobContext, payload: Steps) -> Steps:
    """Reports progress after each step; returns a model, which comes back as its JSON form."""
    for step in range(1, payload.steps + 1):
        ctx.progress(done=step, total=payload.steps, message=f"step {step}")
    ctx.log.info("test.counted", steps=payload.steps)
    return payload


def fail(ctx: ProcessJobContext, payload: Any) -> None:
    raise ValueError(f"failing on purpose in {os.getpid()}")


def fail_unpicklable(ctx: ProcessJobContext, payload: Any) -> None:
    raise Unpicklable("no way back", "two arguments")


def exit_abruptly(ctx: ProcessJobContext, payload: Any) -> None:
    os._exit(3)


def wait_for_cancel(ctx: ProcessJobContext, payload: Marker | None) -> dict[str, Any]:
    """Spins (CPU-bound, checking `ctx.cancelled`) until told to stop; reports its pid when it starts."""
    ctx.progress(percent=0, message=str(os.getpid()))
    deadline = time.monotonic() + GIVE_UP_S
    while not ctx.cancelled.is_set():
        if time.monotonic() > deadline:
            return {"cancelled": False}
    if payload is not None:
        Path(payload.path).write_text(str(os.getpid()))
    return {"cancelled": True}


def ignore_cancel(ctx: ProcessJobContext, payload: Any) -> None:
    """Never looks at `ctx.cancelled`; reports its pid when it starts."""
    ctx.progress(percent=0, message=str(os.getpid()))
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        pass
