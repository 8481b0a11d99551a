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
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from conveyor.embedded.kafka import is_port_free

JOB_TYPE = "demo.noop"
JOB_BODY: dict[str, Any] = {"type": JOB_TYPE, "payload": {}}
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_JOBS = 2000
DEFAULT_CONCURRENCY = 32
DEFAULT_WORKERS = 2
DEFAULT_WARMUP = 50
DEFAULT_STARTUP_TIMEOUT_S = 180.0
DEFAULT_WAIT_TIMEOUT_S = 300.0
WARMUP_WAIT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 90.0
READY_POLL_S = 0.25
# Only how soon the benchmark notices finished jobs, not the figures (they come from the jobs' timestamps).
POLL_INTERVAL_S = 1.0
# Rounds in a row that finish nothing before the waiter polls every unfinished job, not just the oldest.
IDLE_ROUNDS_BEFORE_FULL_SWEEP = 4
FINAL_SWEEP_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40
# Below Linux's default ephemeral range (32768+), like the embedded Kafka's own port search.
PORT_RANGE = (20000, 32000)
LOCALHOST = "127.0.0.1"

console = Console(highlight=False)


# --- figures ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0-100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


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
class Figures:
    settings: dict[str, Any]
    startup_s: float | None = None
    load_avg_end: float | None = None
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
        "latency_ms": {
            "p50": rounded(percentile(lat, 50)),
            "p90": rounded(percentile(lat, 90)),
            "p99": rounded(percentile(lat, 99)),
            "max": rounded(max(lat) if lat else None),
        },
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


def table(title: str, rows: Sequence[tuple[str, str, str]]) -> Table:
    out = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False, pad_edge=False)
    out.add_column("figure")
    out.add_column("value", justify="right")
    out.add_column("unit")
    for row in rows:
        out.add_row(*row)
    return out


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

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far) of a live process, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)"; comm may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _component(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [arg.decode(errors="replace") for arg in argv if arg]
    if words and words[0].endswith("java"):
        return "kafka"
    if "conveyor" in words:
        command = words[words.index("conveyor") + 1 :][:1]
        return command[0] if command else "conveyor"
    return Path(words[0]).name if words else "?"


def stack_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds per component (run, gateway, worker, progress, kafka) of `root_pid` and its children."""
    if not Path("/proc").is_dir():
        return {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    tree = {root_pid}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    totals: dict[str, float] = {}
    for pid in tree:
        if pid in stats:
            name = _component(pid)
            totals[name] = totals.get(name, 0.0) + stats[pid][1]
    return dict(totals)


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


# --- the embedded stack -----------------------------------------------------------------------------


def free_ports(count: int, taken: set[int]) -> int:
    """A base port from which `count` consecutive ports are free now and not in `taken`."""
    low, high = PORT_RANGE
    for _ in range(500):
        base = random.randint(low, high - count)
        block = range(base, base + count)
        if not taken.intersection(block) and all(is_port_free(port) for port in block):
            taken.update(block)
            return base
    raise RuntimeError(f"no block of {count} free ports in {low}-{high}")


def database_kind(url: str | None) -> str:
    if not url:
        return "sqlite"
    return url.split("://", 1)[0].split("+", 1)[0]


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class StackError(RuntimeError):
    pass


class EmbeddedStack:
    """`python -m conveyor run` as a subprocess, in a fresh data folder, on free ports."""

    # Inherited settings that would point the stack somewhere else than where the benchmark looks.
    OVERRIDDEN = (
        "CONVEYOR_API_KEYS",
        "CONVEYOR_KAFKA_BOOTSTRAP",
        "CONVEYOR_DATABASE_URL",
        "CONVEYOR_HOST",
        "CONVEYOR_PUBLIC_URL",
        "CONVEYOR_PROGRESS_PUBLIC_URL",
    )

    def __init__(self, workers: int, database_url: str | None, worker_concurrency: int | None) -> None:
        self.workers = workers
        self.database_url = database_url
        self.worker_concurrency = worker_concurrency
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "stack.log"
        taken: set[int] = set()
        self.kafka_port = free_ports(2, taken)  # the broker, and the controller on the port after it
        self.gateway_port = free_ports(1, taken)
        self.progress_port = free_ports(1, taken)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.gateway_port}"

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if key not in self.OVERRIDDEN}
        env.update(
            CONVEYOR_DATA_DIR=str(self.data_dir),
            CONVEYOR_HOST=LOCALHOST,
            CONVEYOR_KAFKA_PORT=str(self.kafka_port),
            CONVEYOR_GATEWAY_PORT=str(self.gateway_port),
            CONVEYOR_PROGRESS_PORT=str(self.progress_port),
            CONVEYOR_WORKERS=str(self.workers),
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["CONVEYOR_DATABASE_URL"] = self.database_url
        if self.worker_concurrency is not None:
            env["CONVEYOR_WORKER_CONCURRENCY"] = str(self.worker_concurrency)
        with self.log_path.open("wb") as log:
            # Its own session: a Ctrl-C in the terminal reaches only the benchmark, which then stops the
            # stack with SIGTERM and waits for it, so the stack is never stopped twice at once.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "run"],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> float:
        """Poll GET /readyz until it answers 200; returns the seconds it took."""
        assert self.process is not None
        started = time.perf_counter()
        deadline = started + timeout_s
        last = "no answer yet"
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise StackError(f"`conveyor run` exited with status {code} before it was ready")
                try:
                    response = client.get("/readyz")
                    if response.status_code == 200:
                        return time.perf_counter() - started
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.perf_counter() > deadline:
                    raise StackError(f"the gateway was not ready after {timeout_s:.0f} s (last: {last})")
                time.sleep(READY_POLL_S)

    def api_key(self) -> str:
        return (self.data_dir / "dev-api-key").read_text().strip()

    def stop(self) -> None:
        """SIGTERM `conveyor run` (it stops the services, then Kafka) and wait for it to exit."""
        process = self.process
        if process is None:
            return
        if process.poll() is not None:
            self.stop_orphaned_kafka()
            return
        console.print("Stopping the stack...", style="dim")
        started = time.perf_counter()
        # A second Ctrl-C or SIGTERM must not leave the stack half stopped.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                console.print(
                    f"[red]`conveyor run` (pid {process.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; "
                    f"killing it; its services or Kafka may be left running (see {self.log_path})[/red]"
                )
                process.kill()
                code = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        console.print(
            f"Stack stopped in {time.perf_counter() - started:.1f} s (exit status {code}).", style="dim"
        )
        self.stop_orphaned_kafka()

    def stop_orphaned_kafka(self) -> None:
        """Stop a Kafka JVM that `conveyor run` left behind.

        `conveyor run` stops Kafka on SIGTERM only once its services run: a SIGTERM while it is still
        starting (a startup timeout, a Ctrl-C during startup) kills it at once, and the JVM, which leads
        its own session, lives on. Only a process whose command line names this run's data folder is
        touched.
        """
        for pid_file in sorted((self.data_dir / "kafka").glob("node-*/kafka.pid")):
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue  # gone, as it should be
            if str(self.data_dir).encode() not in cmdline:
                continue
            console.print(f"[yellow]`conveyor run` left Kafka running (pid {pid}); stopping it.[/yellow]")
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(READY_POLL_S)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --- main -------------------------------------------------------------------------------------------


def make_client(url: str, key: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=REQUEST_TIMEOUT_S,
    )


async def run_benchmark(
    args: argparse.Namespace, url: str, key: str, figures: Figures, stack_pid: int | None
) -> None:
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--url", help="a running gateway; without it the benchmark starts its own stack")
    parser.add_argument("--key", help="API key for --url (default: env CONVEYOR_BENCH_KEY)")
    parser.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS, help="jobs to measure (default %(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="worker processes to start (default %(default)s)"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, help="jobs per worker at once (CONVEYOR_WORKER_CONCURRENCY)"
    )
    parser.add_argument("--database-url", help="database for the started stack (default: SQLite)")
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="warm-up jobs, not measured (default %(default)s)"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        help="seconds (default %(default)s)",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        help="seconds phase 2 waits for the jobs (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep the started stack's temporary folder")
    args = parser.parse_args(argv)
    for name in ("jobs", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.workers < 0:
        parser.error("--warmup and --workers cannot be negative")
    if args.url and not (args.key or os.environ.get("CONVEYOR_BENCH_KEY")):
        parser.error("--url needs --key or CONVEYOR_BENCH_KEY")
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
        "cpu_count": os.cpu_count(),
        "platform": sys.platform,
        "python": sys.version.split()[0],
        "load_avg_start": os.getloadavg()[0],
    }


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside the event loop: unwind like Ctrl-C, so that the `finally` stopping the stack runs."""
    raise KeyboardInterrupt


async def cancel_on_sigterm(work: Coroutine[Any, Any, None]) -> None:
    """Run `work`; SIGTERM cancels it (an exception raised from a signal handler would escape from
    whichever task happens to run, and SIGINT may be ignored, as in a background job)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)  # which resets it to SIG_DFL
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stack: EmbeddedStack | None = None
    failed = True
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.url:
            url = args.url.rstrip("/")
            key = args.key or os.environ["CONVEYOR_BENCH_KEY"]
            figures = Figures(settings_of(args, url))
            print_header(figures.settings)
        else:
            stack = EmbeddedStack(args.workers, args.database_url, args.worker_concurrency)
            url = stack.url
            figures = Figures(settings_of(args, url))
            print_header(figures.settings)
            console.print(
                f"Starting the stack (`conveyor run`; Kafka on ports {stack.kafka_port}-"
                f"{stack.kafka_port + 1}, data and log in {stack.root})..."
            )
            stack.start()
            try:
                figures.startup_s = round(stack.wait_ready(args.startup_timeout), 2)
            except StackError as exc:
                console.print(f"[red]Startup failed: {exc}[/red]")
                console.print(f"Stack log: {stack.log_path}; its last lines:")
                console.print(tail(stack.log_path), markup=False)
                return 1
            console.print(f"Stack ready in {figures.startup_s:.1f} s (GET /readyz answered 200).")
            key = stack.api_key()

        stack_pid = stack.process.pid if stack is not None and stack.process is not None else None
        asyncio.run(cancel_on_sigterm(run_benchmark(args, url, key, figures, stack_pid)))
        figures.load_avg_end = os.getloadavg()[0]
        console.print(f"Load average (1 min) at the end: {figures.load_avg_end:.2f}")
        if args.json:
            args.json.write_text(json.dumps(figures.__dict__, indent=2) + "\n")
            console.print(f"Figures written to {args.json}")
        failed = False
        return 0
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]Interrupted.[/yellow]")
        return 130
    finally:
        if stack is not None:
            stack.stop()
            if failed or args.keep_data:
                console.print(f"Stack data and log kept in {stack.root}")
            else:
                stack.remove()
        signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
