"""Built-in demo job types, loaded by default: `demo.echo`, `demo.sleep`, `demo.fail`, `demo.noop`,
`demo.stubborn`, which ignores cancels (for trying out the grace period), and `demo.crunch`, which is
CPU-bound and runs in the worker's process pool."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor.handlers import JobContext, ProcessJobContext, job

MAX_SLEEP_S = 3600
MAX_STEPS = 1000
MAX_CRUNCH_N = 100_000_000


class SleepIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=1.0, ge=0, le=MAX_SLEEP_S, description="How long the job runs.")
    steps: int = Field(default=1, ge=1, le=MAX_STEPS, description="Progress reports, one after each step.")


class FailIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_times: int = Field(default=1, ge=0, description="Raise on the first N attempts, then succeed.")


class StubbornIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=30.0, ge=0, le=MAX_SLEEP_S, description="How long the job runs.")


class CrunchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=100_000, ge=1, le=MAX_CRUNCH_N, description="Count the primes below n.")
    steps: int = Field(default=10, ge=1, le=MAX_STEPS, description="Progress reports, one after each step.")


class DemoFailure(RuntimeError):
    pass


class DemoStopped(RuntimeError):
    """Raised by `demo.sleep` and `demo.crunch` when told to stop: a job cut short did not do its work,
    so it must not look like a success. The worker discards it anyway (a canceled job records nothing)."""


async def sleep_unless_stopped(ctx: JobContext, seconds: float) -> bool:
    """Sleep `seconds`, waking early if the job is told to stop; True if it was."""
    if ctx.cancelled.is_set():
        return True
    try:
        await asyncio.wait_for(ctx.cancelled.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


@job("demo.echo")
async def echo(ctx: JobContext, payload: Any) -> Any:
    """Returns its payload as the result."""
    return payload


@job("demo.noop")
async def noop(ctx: JobContext, payload: Any) -> None:
    """Does nothing: for measuring the system itself."""


@job("demo.sleep", payload=SleepIn)
async def sleep(ctx: JobContext, payload: SleepIn) -> dict[str, Any]:
    """Sleeps `seconds` in `steps` steps, reporting progress after each step; stops early when canceled."""
    for step in range(1, payload.steps + 1):
        if await sleep_unless_stopped(ctx, payload.seconds / payload.steps):
            raise DemoStopped(f"stopped during step {step} of {payload.steps}")
        await ctx.progress(done=step, total=payload.steps, message=f"step {step} of {payload.steps}")
    return {"slept_s": payload.seconds, "steps": payload.steps}


@job("demo.fail", payload=FailIn, max_attempts=3)
async def fail(ctx: JobContext, payload: FailIn) -> dict[str, int]:
    """Raises on the first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= payload.fail_times:
        raise DemoFailure(f"failing on purpose: attempt {ctx.attempt} of the first {payload.fail_times}")
    return {"attempts": ctx.attempt}


@job("demo.stubborn", payload=StubbornIn)
async def stubborn(ctx: JobContext, payload: StubbornIn) -> dict[str, float]:
    """Sleeps `seconds` and never looks at ctx.cancelled, so a cancel must interrupt it after the grace."""
    await asyncio.sleep(payload.seconds)
    return {"slept_s": payload.seconds}


@job("demo.crunch", payload=CrunchIn, process=True)
def crunch(ctx: ProcessJobContext, payload: CrunchIn) -> dict[str, int]:
    """Counts the primes below `n` by trial division in a worker's process (CPU-bound), reporting progress
    after each of `steps` steps; stops early when canceled."""
    primes = 0
    for step in range(1, payload.steps + 1):
        start, end = payload.n * (step - 1) // payload.steps, payload.n * step // payload.steps
        for number in range(start, end):
            # Cheap on every iteration: the child asks the worker at most ten times a second.
            if ctx.cancelled.is_set():
                raise DemoStopped(f"stopped at {number} during step {step} of {payload.steps}")
            primes += is_prime(number)
        ctx.progress(done=step, total=payload.steps, message=f"step {step} of {payload.steps}")
    ctx.log.info("demo.crunched", n=payload.n, primes=primes)
    return {"n": payload.n, "primes": primes}


def is_prime(number: int) -> bool:
    return number >= 2 and all(number % divisor for divisor in range(2, math.isqrt(number) + 1))
