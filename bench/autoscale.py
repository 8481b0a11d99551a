"""Autoscaling benchmark: how fast `conveyor run`'s autoscaler adds workers under a backlog, and how
fast it drains them back to the minimum once the backlog is done.

It prints figures and asserts nothing. It starts its own embedded stack (``python -m conveyor run``)
with the autoscaler on (``CONVEYOR_WORKERS_MIN=1``, ``CONVEYOR_WORKERS_MAX=--max-workers``), in a fresh
temporary data folder on free ports, and stops it at the end.

1. Once the stack runs its one worker, ``--backlog`` ``demo.sleep`` jobs of ``--job-seconds`` each are
   submitted in batches of up to 1,000 (``POST /v1/jobs/batch``).
2. The worker processes of the supervisor are counted every quarter second (from /proc), and the
   autoscaler's decisions read from the stack's log (``autoscaler.decision``): the time from the
   backlog's acceptance to the first scale-out decision, to the second worker process, and to the peak.
3. Once every job has finished, the time until the workers are back to one (the idle window,
   ``--idle-seconds``, then one drained worker at a time).

    python bench/autoscale.py [--backlog 400] [--job-seconds 1] [--max-workers 4] [--worker-concurrency 8]
                              [--idle-seconds 60] [--database-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import benchkit as kit
import httpx
from sqlalchemy import text

from conveyor.settings import (
    DEFAULT_WORKER_CONCURRENCY,
    DEFAULT_WORKERS_IDLE_S,
    DEFAULT_WORKERS_MAX,
    Settings,
)

JOB_TYPE = "demo.sleep"
DEFAULT_BACKLOG = 400
DEFAULT_JOB_SECONDS = 1.0
DEFAULT_WAIT_TIMEOUT_S = 600.0
BATCH = 1000
# How often the worker processes are counted: the resolution of the figures.
SAMPLE_S = 0.25
POLL_INTERVAL_S = 0.5
# When each worker (by its id, which holds its pid) started its first job.
FIRST_STARTS_SQL = text(
    "SELECT worker_id, min(started_at) FROM jobs WHERE worker_id IS NOT NULL GROUP BY worker_id"
)


@dataclass
class Figures(kit.StackFigures):
    backlog: dict[str, Any] = field(default_factory=dict)
    scale_out: dict[str, Any] = field(default_factory=dict)
    scale_in: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)


class WorkerCount:
    """The supervisor's worker processes, counted every SAMPLE_S: (time.time(), count) at each change."""

    def __init__(self, stack: kit.EmbeddedStack) -> None:
        self.stack = stack
        self.changes: list[tuple[float, int]] = []

    def now(self) -> int:
        root = self.stack.pid
        assert root is not None
        return sum(
            1
            for pid in kit.process_tree(root)
            if kit.component(pid) == "worker" and (stat := kit.proc_stat(pid)) is not None and stat[0] == root
        )

    async def run(self) -> None:
        while True:
            count = self.now()
            if not self.changes or self.changes[-1][1] != count:
                self.changes.append((time.time(), count))
            await asyncio.sleep(SAMPLE_S)

    def first_at_least(self, count: int, after: float) -> float | None:
        return next((at for at, n in self.changes if at >= after and n >= count), None)

    async def wait_for(self, count: int, timeout_s: float) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.changes and self.changes[-1][1] == count:
                return self.changes[-1][0]
            await asyncio.sleep(SAMPLE_S)
        return None


def decisions(stack: kit.EmbeddedStack) -> list[dict[str, Any]]:
    """The autoscaler's logged decisions (the stack logs JSON), oldest first."""
    found = []
    for line in stack.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "autoscaler.decision":
            record["at"] = datetime.fromisoformat(record["timestamp"]).timestamp()
            found.append(record)
    return found


async def submit_backlog(client: httpx.AsyncClient, count: int, seconds: float) -> float:
    """Submit the backlog in batches; the seconds it took."""
    body = {"type": JOB_TYPE, "payload": {"seconds": seconds, "steps": 1}}
    started = time.perf_counter()
    for start in range(0, count, BATCH):
        size = min(BATCH, count - start)
        response = await client.post("/v1/jobs/batch", json={"jobs": [body] * size})
        response.raise_for_status()
    return time.perf_counter() - started


async def first_starts(db: kit.JobsDatabase) -> list[float]:
    """When each worker started its first job, earliest first (epoch seconds)."""
    starts = [kit.epoch_seconds(started) for _, started in await db.fetch(FIRST_STARTS_SQL)]
    return sorted(at for at in starts if at is not None)


async def wait_finished(db: kit.JobsDatabase, count: int, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if kit.finished_count(await db.status_counts()) >= count:
            return time.time()
        await asyncio.sleep(POLL_INTERVAL_S)
    return None


def since(at: float | None, origin: float) -> float | None:
    return round(at - origin, 1) if at is not None else None


async def run_benchmark(
    args: argparse.Namespace, figures: Figures, url: str, key: str, stack: kit.EmbeddedStack | None
) -> None:
    assert stack is not None, "the benchmark starts its own stack"
    db = kit.JobsDatabase(stack.read_url)
    workers = WorkerCount(stack)
    counting = asyncio.create_task(workers.run())
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if await workers.wait_for(1, args.wait_timeout) is None:
            kit.console.print("[red]The stack never ran its one worker.[/red]")
            return
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=kit.REQUEST_TIMEOUT_S) as client:
            kit.console.print(f"Submitting {args.backlog:,} jobs of {args.job_seconds:g} s to one worker...")
            submit_s = await submit_backlog(client, args.backlog, args.job_seconds)
        accepted = time.time()
        figures.backlog = {"jobs": args.backlog, "submit_s": round(submit_s, 2)}
        done = await wait_finished(db, args.backlog, args.wait_timeout)
        peak = max(n for _, n in workers.changes)
        scale_out = next(
            (d for d in decisions(stack) if d["reason"] == "scale_out" and d["at"] >= accepted - submit_s),
            None,
        )
        figures.scale_out = {
            "decision_s": since(scale_out["at"] if scale_out else None, accepted),
            "decided_workers": scale_out["desired_workers"] if scale_out else None,
            "second_worker_s": since(workers.first_at_least(2, accepted - submit_s), accepted),
            "peak_workers": peak,
            "peak_s": since(workers.first_at_least(peak, accepted - submit_s), accepted),
        }
        starts = await first_starts(db)
        figures.scale_out["added_worker_first_job_s"] = since(
            starts[1] if len(starts) > 1 else None, accepted
        )
        one_worker_s = args.backlog * args.job_seconds / args.worker_concurrency
        figures.backlog.update(done_s=since(done, accepted), one_worker_at_best_s=round(one_worker_s, 1))
        kit.console.print("Backlog done; waiting for the workers to go back to one...")
        back = await workers.wait_for(1, args.wait_timeout) if done is not None else None
        figures.scale_in = {"back_to_one_s": since(back, done) if done is not None else None}
    finally:
        counting.cancel()
        await asyncio.gather(counting, return_exceptions=True)
        await db.close()
    figures.timeline = [(round(at - accepted, 1), n) for at, n in workers.changes]
    print_figures(figures)


def print_figures(fig: Figures) -> None:
    out, back, backlog = fig.scale_out, fig.scale_in, fig.backlog
    rows = [
        (
            "scale-out decision",
            f"{kit.fmt(out['decision_s'])} s",
            f"to {out['decided_workers']} workers, after the backlog was accepted",
        ),
        (
            "second worker",
            f"{kit.fmt(out['second_worker_s'])} s",
            "its process running, after the backlog was accepted",
        ),
        (
            "first job on an added worker",
            f"{kit.fmt(out['added_worker_first_job_s'])} s",
            "it joined the group, took partitions and started a job",
        ),
        ("peak", f"{out['peak_workers']} workers", f"at {kit.fmt(out['peak_s'])} s"),
        (
            "backlog done",
            f"{kit.fmt(backlog['done_s'])} s",
            f"one worker alone: {kit.fmt(backlog['one_worker_at_best_s'])} s at best",
        ),
        ("back to one worker", f"{kit.fmt(back['back_to_one_s'])} s", "after the backlog was done"),
        ("timeline", " ".join(f"{n}@{at:g}" for at, n in fig.timeline), "workers @ seconds after acceptance"),
    ]
    kit.console.print(kit.table("Autoscaler reaction", rows))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = kit.new_parser(__doc__)
    kit.add_option(parser, "--backlog", DEFAULT_BACKLOG, "jobs submitted at once")
    kit.add_option(parser, "--job-seconds", DEFAULT_JOB_SECONDS, "how long each job runs")
    kit.add_option(parser, "--max-workers", DEFAULT_WORKERS_MAX, "CONVEYOR_WORKERS_MAX")
    kit.add_option(parser, "--worker-concurrency", DEFAULT_WORKER_CONCURRENCY, "jobs per worker at once")
    kit.add_option(parser, "--idle-seconds", DEFAULT_WORKERS_IDLE_S, "CONVEYOR_WORKERS_IDLE_S")
    kit.add_database_option(parser)
    kit.add_stack_options(parser, DEFAULT_WAIT_TIMEOUT_S, "seconds each wait may take")
    parser.set_defaults(url=None, key=None)  # always a started stack: it counts the stack's processes
    args = parser.parse_args(argv)
    kit.check_at_least_one(parser, args, ("backlog", "max_workers", "worker_concurrency"))
    if args.job_seconds < 0 or args.idle_seconds <= 0:
        parser.error("--job-seconds cannot be negative, --idle-seconds must be positive")
    return args


def new_stack(args: argparse.Namespace) -> kit.EmbeddedStack:
    settings = {
        "CONVEYOR_WORKERS_MIN": "1",
        "CONVEYOR_WORKERS_MAX": str(args.max_workers),
        "CONVEYOR_WORKERS_IDLE_S": str(args.idle_seconds),
        "CONVEYOR_LOG_JSON": "true",
    }
    return kit.EmbeddedStack(None, args.database_url, args.worker_concurrency, settings=settings)


def new_figures(args: argparse.Namespace, url: str, stack: kit.EmbeddedStack | None) -> Figures:
    return Figures(
        {
            "backlog": args.backlog,
            "job_seconds": args.job_seconds,
            "max_workers": args.max_workers,
            "worker_concurrency": args.worker_concurrency,
            "idle_seconds": args.idle_seconds,
            "partitions": Settings().partitions,
            "database": kit.database_kind(args.database_url),
            **kit.machine_settings(),
            "load_avg_start": os.getloadavg()[0],
        }
    )


def print_header(settings: dict[str, Any]) -> None:
    rows = [
        ("backlog", f"{settings['backlog']:,} jobs", f"{JOB_TYPE}, {settings['job_seconds']:g} s each"),
        ("workers", f"1 to {settings['max_workers']}", f"{settings['worker_concurrency']} slots each"),
        ("idle window", f"{settings['idle_seconds']:g} s", "CONVEYOR_WORKERS_IDLE_S"),
        ("database", settings["database"], ""),
        kit.machine_row(settings),
    ]
    kit.print_header_table("Autoscaling benchmark", rows, settings)


def main(argv: Sequence[str] | None = None) -> int:
    return kit.run_main(parse_args(argv), new_stack, new_figures, print_header, run_benchmark)


if __name__ == "__main__":
    sys.exit(main())
