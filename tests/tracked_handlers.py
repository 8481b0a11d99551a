"""A handler for the fault tests that writes down, outside the database, when each attempt ran: every
write of a superseded attempt is fenced off in the database, so only the handler's own record can
show whether two attempts of one job ever ran at the same time. Loaded by the workers of those tests
(`CONVEYOR_HANDLERS`, with this folder on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from conveyor.handlers import JobContext, job


class TrackedIn(BaseModel):
    seconds: float
    # The file each attempt appends its start and its end to, one line each.
    log: str


@job("test.tracked", payload=TrackedIn)
async def tracked(ctx: JobContext, payload: TrackedIn) -> None:
    _append(payload.log, "start", ctx)
    await asyncio.sleep(payload.seconds)
    _append(payload.log, "end", ctx)


def _append(path: str, what: str, ctx: JobContext) -> None:
    # One write of a short line to a file opened for appending: lines of concurrent writers never mix.
    line = f"{what} {ctx.job_id} {ctx.attempt} {os.getpid()} {time.time():.6f}\n"
    with open(path, "a") as log:
        log.write(line)


@dataclass
class Attempt:
    job_id: str
    attempt: int
    pid: int
    started_at: float
    ended_at: float | None = None


def attempts_run(path: Path) -> dict[str, list[Attempt]]:
    """Each job's attempts as the handler recorded them, by attempt number."""
    runs: dict[tuple[str, int], Attempt] = {}
    for line in path.read_text().splitlines():
        what, job_id, attempt, pid, at = line.split()
        key = (job_id, int(attempt))
        if what == "start":
            runs[key] = Attempt(job_id, int(attempt), int(pid), float(at))
        else:
            runs[key].ended_at = float(at)
    by_job: dict[str, list[Attempt]] = {}
    for run in sorted(runs.values(), key=lambda run: run.attempt):
        by_job.setdefault(run.job_id, []).append(run)
    return by_job
