"""Throughput benchmark: how fast the gateway accepts jobs, and how fast the system finishes them.

It prints figures and asserts nothing. Without ``--url`` it starts its own embedded stack
(``python -m conveyor run``) in a fresh temporary data folder on free ports and stops it at the end.

Phase 1 (accept rate): after a warm-up, ``--jobs`` ``demo.noop`` jobs are submitted by ``--concurrency``
concurrent requests (a closed loop over one httpx.AsyncClient); each request's latency is recorded.

Phase 2 (end to end): the jobs are polled until they are finished; each job's end-to-end latency
(``created_at`` to ``finished_at``) and queue wait (``created_at`` to ``started_at``) come from the job
resource itself, so how often the benchmark polls changes the load but not the figures.

    python bench/throughput.py [--url URL --key KEY] [--jobs 2000] [--concurrency 32] [--workers 2]
                               [--database-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from benchkit import (
    DEFAULT_WORKERS,
    REQUEST_TIMEOUT_S,
    TERMINAL,
    EmbeddedStack,
    StackFigures,
    add_database_option,
    add_key_option,
    add_option,
    add_stack_options,
    add_url_option,
    check_at_least_one,
    check_target,
    console,
    database_kind,
    fmt,
    machine_settings,
    new_parser,
    percentile,
    quantiles,
    rounded,
    run_main,
    stack_cpu,
    table,
)

JOB_TYPE = "demo.noop"
JOB_BODY: dict[str, Any] = {"type": JOB_TYPE, "payload": {}}

DEFAULT_JOBS = 2000
DEFAULT_CONCURRENCY = 32
DEFAULT_WARMUP = 50
DEFAULT_WAIT_TIMEOUT_S = 300.0
WARMUP_WAIT_TIMEOUT_S = 120.0
# Only how soon the benchmark notices finished jobs, not the figures (they come from the jobs' timestamps).
POLL_INTERVAL_S = 1.0
# Rounds in a row that finish nothing before the waiter polls every unfinished job, not just the oldest.
IDLE_ROUNDS_BEFORE_FULL_SWEEP = 4
FINAL_SWEEP_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 5.0


# --- figures ----------------------------------------------------------------------------------------


def parse_ts(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


@dataclass
class SubmitResult:
    ids: list[str]
    latencies_ms: list[float]
    outcomes: Counter[str]
    wall_s: float
    cpu_s: float


@dataclass
class WaitResult:
    jobs: dict[str, dict[str, Any]]
    unfinished: list[str]
    wall_s: float
    polls: int
    poll_errors: Counter[str]
    timed_out: bool


@dataclass
class Figures(StackFigures):
    warmup: dict[str, Any] = field(default_factory=dict)
    accept: dict[str, Any] = field(default_factory=dict)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    stack_cpu: dict[str, Any] = field(default_factory=dict)


# --- load -------------------------------------------------------------------------------------------


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def submit_jobs(client: httpx.AsyncClient, count: int, concurrency: int) -> SubmitResult:
    """Submit `count` jobs from `concurrency` request loops; ids come back in submission order."""
    ids: list[str | None] = [None] * count
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    numbers = iter(range(count))

    async def loop() -> None:
        for n in numbers:  # shared iterator: each number goes to exactly one loop
            started = time.perf_counter()
            try:
                response = await client.post("/v1/jobs", json=JOB_BODY)
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            outcomes[str(response.status_code)] += 1
            if response.status_code == 202:
                latencies.append(elapsed_ms)
                ids[n] = response.json()["id"]

    cpu_before = cpu_time()
    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(min(concurrency, count))))
    wall_s = time.perf_counter() - started
    return SubmitResult(
        ids=[job_id for job_id in ids if job_id is not None],
        latencies_ms=latencies,
        outcomes=outcomes,
        wall_s=wall_s,
        cpu_s=cpu_time() - cpu_before,
    )


async def wait_for_jobs(
    client: httpx.AsyncClient, ids: Sequence[str], concurrency: int, timeout_s: float, label: str
) -> WaitResult:
    """Poll the unfinished jobs until all are terminal or `timeout_s` passes.

    Each round polls the unfinished jobs oldest first, `concurrency` at a time, and ends early at the
    first batch in which nothing has finished: the younger jobs behind a backlog are not done either.
    After a few rounds that finish nothing, a round polls every unfinished job, and so does the last
    round at the deadline, so that the count of unfinished jobs is exact. The figures come from the
    jobs' own timestamps, so polling late only costs time, never accuracy.
    """
    pending: dict[str, None] = dict.fromkeys(ids)
    finished: dict[str, dict[str, Any]] = {}
    errors: Counter[str] = Counter()
    polls = 0
    started = time.perf_counter()
    deadline = started + timeout_s
    next_report = started + PROGRESS_EVERY_S
    idle_rounds = 0

    async def poll(job_id: str) -> tuple[str, dict[str, Any] | None]:
        nonlocal polls
        polls += 1
        try:
            response = await client.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
            return job_id, None
        if response.status_code != 200:
            errors[str(response.status_code)] += 1
            return job_id, None
        body: dict[str, Any] = response.json()
        return job_id, body if body.get("status") in TERMINAL else None

    async def sweep(full: bool) -> int:
        done = 0
        order = list(pending)
        for start in range(0, len(order), concurrency):
            results = await asyncio.gather(*(poll(job_id) for job_id in order[start : start + concurrency]))
            batch_done = 0
            for job_id, body in results:
                if body is not None:
                    finished[job_id] = body
                    del pending[job_id]
                    batch_done += 1
            done += batch_done
            if batch_done == 0 and not full:
                break
        return done

    timed_out = False
    while pending:
        now = time.perf_counter()
        if now >= deadline:
            # Bounded too: a gateway that hangs must not hold the benchmark for batches of timeouts.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_SWEEP_TIMEOUT_S):
                    await sweep(full=True)
            timed_out = bool(pending)
            break
        full = idle_rounds >= IDLE_ROUNDS_BEFORE_FULL_SWEEP
        done = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline - now):
                done = await sweep(full=full)
        idle_rounds = 0 if done or full else idle_rounds + 1
        now = time.perf_counter()
        if now >= next_report and pending:
            console.print(
                f"  {label}: {len(finished):,}/{len(ids):,} finished after {now - started:.1f} s", style="dim"
            )
            next_report = now + PROGRESS_EVERY_S
        if pending and done < concurrency:
            await asyncio.sleep(POLL_INTERVAL_S)
    return WaitResult(
        jobs=finished,
        unfinished=list(pending),
        wall_s=time.perf_counter() - started,
        polls=polls,
        poll_errors=errors,
        timed_out=timed_out,
    )


def accept_figures(result: SubmitResult, jobs: int) -> dict[str, Any]:
    accepted = result.outcomes.get("202", 0)
    lat = result.latencies_ms
    return {
        "total": jobs,
        "accepted": accepted,
        "errors": jobs - accepted,
        "error_kinds": {kind: n for kind, n in result.outcomes.items() if kind != "202"},
        "wall_s": round(result.wall_s, 3),
        "accept_rate_per_s": round(accepted / result.wall_s, 1) if result.wall_s > 0 else None,
        "latency_ms": quantiles(lat),
        "client_cpu_s": round(result.cpu_s, 2),
    }


def end_to_end_figures(wait: WaitResult, submitted: int) -> dict[str, Any]:
    statuses = Counter(body["status"] for body in wait.jobs.values())
    e2e_ms: list[float] = []
    queue_ms: list[float] = []
    created: list[datetime] = []
    finished: list[datetime] = []
    for body in wait.jobs.values():
        created_at = parse_ts(body["created_at"])
        started_at = parse_ts(body.get("started_at"))
        finished_at = parse_ts(body.get("finished_at"))
        if created_at is None or body["status"] != "succeeded" or finished_at is None:
            continue
        created.append(created_at)
        finished.append(finished_at)
        e2e_ms.append((finished_at - created_at).total_seconds() * 1000)
        if started_at is not None:
            queue_ms.append((started_at - created_at).total_seconds() * 1000)
    span_s = (max(finished) - min(created)).total_seconds() if created else None
    drain_s = (max(finished) - max(created)).total_seconds() if created else None
    succeeded = statuses.get("succeeded", 0)
    return {
        "submitted": submitted,
        "succeeded": succeeded,
        "failed": statuses.get("failed", 0),
        "canceled": statuses.get("canceled", 0),
        "unfinished": len(wait.unfinished),
        "timed_out": wait.timed_out,
        "span_s": rounded(span_s, 3),
        "rate_per_s": round(succeeded / span_s, 1) if span_s else None,
        "drain_after_last_accept_s": rounded(drain_s, 3),
        "e2e_ms": {"p50": rounded(percentile(e2e_ms, 50)), "p99": rounded(percentile(e2e_ms, 99))},
        "queue_wait_ms": {"p50": rounded(percentile(queue_ms, 50)), "p99": rounded(percentile(queue_ms, 99))},
        "status_polls": wait.polls,
        "poll_errors": dict(wait.poll_errors),
        "wait_wall_s": round(wait.wall_s, 3),
    }


# --- output -----------------------------------------------------------------------------------------


def print_header(settings: dict[str, Any]) -> None:
    rows = [
        ("gateway", str(settings["gateway"]), str(settings["gateway_origin"])),
        ("job type", JOB_TYPE, ""),
        ("jobs", fmt(settings["jobs"]), f"(+{settings['warmup']} warm-up)"),
        ("concurrency", fmt(settings["concurrency"]), "requests in flight"),
        ("workers", str(settings["workers"]), ""),
        ("worker concurrency", str(settings["worker_concurrency"]), "jobs per worker"),
        ("database", str(settings["database"]), ""),
        ("machine", f"{settings['cpu_count']} cores", f"{settings['platform']}, Python {settings['python']}"),
        ("load average", f"{settings['load_avg_start']:.2f}", "1 min, before the run (CPUs are shared)"),
    ]
    console.print(table("Throughput benchmark", rows))


def print_accept(fig: dict[str, Any]) -> None:
    lat = fig["latency_ms"]
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(fig["error_kinds"].items()))
    rows = [
        ("submitted", fmt(fig["total"]), "jobs"),
        ("errors (not 202)", fmt(fig["errors"]), kinds),
        ("wall time", fmt(fig["wall_s"], 2), "s"),
        ("accept rate", fmt(fig["accept_rate_per_s"]), "jobs/s"),
        ("latency p50", fmt(lat["p50"]), "ms"),
        ("latency p90", fmt(lat["p90"]), "ms"),
        ("latency p99", fmt(lat["p99"]), "ms"),
        ("latency max", fmt(lat["max"]), "ms"),
        ("benchmark CPU", fmt(fig["client_cpu_s"], 2), "s (the load generator shares the machine)"),
    ]
    console.print(table("Phase 1: accept rate (POST /v1/jobs)", rows))


def print_end_to_end(fig: dict[str, Any]) -> None:
    rows = [
        ("succeeded", fmt(fig["succeeded"]), f"of {fig['submitted']:,}"),
        ("failed / canceled", f"{fig['failed']} / {fig['canceled']}", ""),
        ("unfinished", fmt(fig["unfinished"]), "(deadline hit)" if fig["timed_out"] else ""),
        ("first created -> last finished", fmt(fig["span_s"], 2), "s"),
        ("end-to-end rate", fmt(fig["rate_per_s"]), "jobs/s"),
        ("drain after last accept", fmt(fig["drain_after_last_accept_s"], 2), "s"),
        ("end-to-end p50", fmt(fig["e2e_ms"]["p50"]), "ms (created_at -> finished_at)"),
        ("end-to-end p99", fmt(fig["e2e_ms"]["p99"]), "ms"),
        ("queue wait p50", fmt(fig["queue_wait_ms"]["p50"]), "ms (created_at -> started_at)"),
        ("queue wait p99", fmt(fig["queue_wait_ms"]["p99"]), "ms"),
        ("status polls", fmt(fig["status_polls"]), f"in {fig['wait_wall_s']:.1f} s of waiting"),
    ]
    if fig["poll_errors"]:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(fig["poll_errors"].items()))
        rows.append(("poll errors", fmt(sum(fig["poll_errors"].values())), kinds))
    console.print(table("Phase 2: end to end", rows))


# --- CPU of the started stack (Linux /proc) ----------------------------------------------------------


def cpu_figures(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, Any]:
    used = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    cores = os.cpu_count() or 1
    return {
        "wall_s": round(wall_s, 2),
        "cpu_s": {name: round(value, 2) for name, value in sorted(used.items())},
        "total_cpu_s": round(sum(used.values()), 2),
        "machine_share": round(sum(used.values()) / (wall_s * cores), 3) if wall_s > 0 else None,
    }


def print_cpu(fig: dict[str, Any], bench_cpu_s: float) -> None:
    wall = fig["wall_s"]
    rows = [
        (name, fmt(value, 2), f"s ({value / wall:.0%} of a core)" if wall else "s")
        for name, value in fig["cpu_s"].items()
    ]
    rows.append(("stack total", fmt(fig["total_cpu_s"], 2), f"s over {wall:.1f} s of phases 1 and 2"))
    rows.append(("benchmark itself", fmt(bench_cpu_s, 2), "s"))
    console.print(table("CPU used by the started stack during phases 1 and 2", rows))


# --- main -------------------------------------------------------------------------------------------


def make_client(url: str, key: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=REQUEST_TIMEOUT_S,
    )


async def run_benchmark(
    args: argparse.Namespace, figures: Figures, url: str, key: str, stack: EmbeddedStack | None
) -> None:
    stack_pid = stack.pid if stack is not None else None
    async with make_client(url, key, args.concurrency) as client:
        if args.warmup > 0:
            console.print(f"Warm-up: {args.warmup} jobs...")
            warm = await submit_jobs(client, args.warmup, args.concurrency)
            wait = await wait_for_jobs(client, warm.ids, args.concurrency, WARMUP_WAIT_TIMEOUT_S, "warm-up")
            figures.warmup = {
                "jobs": args.warmup,
                "accepted": len(warm.ids),
                "finished": len(wait.jobs),
                "seconds": round(warm.wall_s + wait.wall_s, 3),
            }
            console.print(
                f"Warm-up: {len(warm.ids)}/{args.warmup} accepted, {len(wait.jobs)} finished "
                f"in {warm.wall_s + wait.wall_s:.1f} s"
                + (" [red](deadline hit)[/red]" if wait.timed_out else "")
            )

        console.print(f"Phase 1: submitting {args.jobs:,} jobs, {args.concurrency} at a time...")
        cpu_before = stack_cpu(stack_pid) if stack_pid else {}
        bench_cpu_before = cpu_time()
        started = time.perf_counter()
        submitted = await submit_jobs(client, args.jobs, args.concurrency)
        figures.accept = accept_figures(submitted, args.jobs)
        print_accept(figures.accept)

        console.print(
            f"Phase 2: waiting for {len(submitted.ids):,} jobs to finish "
            f"(deadline {args.wait_timeout:.0f} s)..."
        )
        wait = await wait_for_jobs(client, submitted.ids, args.concurrency, args.wait_timeout, "jobs")
        if wait.timed_out:
            console.print(
                f"[red]Deadline of {args.wait_timeout:.0f} s hit: {len(wait.unfinished):,} jobs unfinished "
                f"(first: {', '.join(wait.unfinished[:3])})[/red]"
            )
        figures.end_to_end = end_to_end_figures(wait, len(submitted.ids))
        print_end_to_end(figures.end_to_end)
        if stack_pid:
            cpu_after = stack_cpu(stack_pid)
            if cpu_after:
                figures.stack_cpu = cpu_figures(cpu_before, cpu_after, time.perf_counter() - started)
                print_cpu(figures.stack_cpu, cpu_time() - bench_cpu_before)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    add_url_option(parser)
    add_key_option(parser)
    add_option(parser, "--jobs", DEFAULT_JOBS, "jobs to measure")
    add_option(parser, "--concurrency", DEFAULT_CONCURRENCY, "requests in flight")
    add_option(parser, "--workers", DEFAULT_WORKERS, "worker processes to start")
    parser.add_argument(
        "--worker-concurrency", type=int, help="jobs per worker at once (CONVEYOR_WORKER_CONCURRENCY)"
    )
    add_database_option(parser)
    add_option(parser, "--warmup", DEFAULT_WARMUP, "warm-up jobs, not measured")
    add_stack_options(parser, DEFAULT_WAIT_TIMEOUT_S, "seconds phase 2 waits for the jobs")
    args = parser.parse_args(argv)
    check_at_least_one(parser, args, ("jobs", "concurrency"))
    if args.warmup < 0 or args.workers < 0:
        parser.error("--warmup and --workers cannot be negative")
    check_target(parser, args)
    return args


def settings_of(args: argparse.Namespace, url: str) -> dict[str, Any]:
    external = bool(args.url)
    worker_concurrency: str | int = args.worker_concurrency or os.environ.get(
        "CONVEYOR_WORKER_CONCURRENCY", "8 (default)"
    )
    return {
        "gateway": url,
        "gateway_origin": "external" if external else "started by the benchmark",
        "jobs": args.jobs,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "workers": "unknown" if external else args.workers,
        "worker_concurrency": "unknown" if external else worker_concurrency,
        "database": database_kind(args.database_url) if args.database_url or not external else "unknown",
        **machine_settings(),
        "load_avg_start": os.getloadavg()[0],
    }


def new_stack(args: argparse.Namespace) -> EmbeddedStack:
    return EmbeddedStack(args.workers, args.database_url, args.worker_concurrency)


def begin(args: argparse.Namespace, url: str, stack: EmbeddedStack | None) -> Figures:
    figures = Figures(settings_of(args, url))
    print_header(figures.settings)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args(argv), new_stack, begin, run_benchmark)


if __name__ == "__main__":
    sys.exit(main())
