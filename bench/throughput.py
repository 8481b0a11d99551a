"""Throughput benchmark: how fast the gateway accepts jobs, how fast the system finishes them, and what each
job costs in CPU and in SQL.

It prints figures and asserts nothing. Without ``--url`` it starts its own embedded stack (``python -m
conveyor run``) in a fresh temporary data folder on free ports, on SQLite (the default) or on a PostgreSQL
that it starts too (``--database postgresql``), and stops everything at the end. Every job is a
``demo.noop``, and each phase is drained (every job it submitted is finished) before the next one starts:

1. accept: ``wrk`` (installed from Debian's packages if missing), closed loop, ``--connections``
   connections for ``--accept-seconds``: 202s per second and wrk's latency percentiles.
2. end to end: ``--jobs`` jobs over ``--connections`` connections (closed loop) from a minimal asyncio
   HTTP/1.1 client; jobs per second, and latency from each request's send time to the job's
   ``finished_at``, read in bulk from the stack's database once all are finished.
3. open loop: at each of ``--rates`` jobs per second for ``--open-seconds``, requests sent on schedule
   whatever the answers take: accept and end-to-end latency per rate.

For every phase: CPU per job of each part of the stack and of the load generator, and SQL transactions
and statements per job as the services count them (``CONVEYOR_SQL_STATS_DIR``).

    python bench/throughput.py [--database postgresql | --database-url URL] [--url URL --key KEY]
        [--accept-seconds 15] [--connections 64] [--jobs 10000] [--rates 100,300,600,1000]
        [--open-seconds 10] [--workers 2] [--phases accept,e2e,open] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchkit as kit

JOB_TYPE = "demo.noop"
JOB_BODY = json.dumps({"type": JOB_TYPE, "payload": {}}).encode()
JOBS_PATH = "/v1/jobs"
CONTENT_TYPE = "application/json"
ACCEPTED = 202

PHASES = ("accept", "e2e", "open")
DEFAULT_ACCEPT_SECONDS = 15
DEFAULT_CONNECTIONS = 64
DEFAULT_JOBS = 10_000
DEFAULT_RATES = "100,300,600,1000"
DEFAULT_OPEN_SECONDS = 10.0
DEFAULT_OPEN_MAX_CONNECTIONS = 512
DEFAULT_WARMUP = 50
DEFAULT_DRAIN_TIMEOUT_S = 300.0
# Connections an open-loop run starts with; it opens more when all are busy.
OPEN_LOOP_FIRST_CONNECTIONS = 16
# From filling the pool to the first scheduled request.
OPEN_LOOP_LEAD_S = 0.2
# How often the benchmark counts finished jobs while it waits: one cheap query, never one per job.
COMPLETION_POLL_S = 1.0
# The services write their SQL counts every 0.5 s: wait this long after a phase for fresh files.
SQL_STATS_SETTLE_S = 1.0
PROGRESS_EVERY_S = 5.0
# The steady window of a run: from this percentile of its jobs' finish times to that one.
STEADY_WINDOW = (5, 95)

WRK_PACKAGE = "wrk"
WRK_THREADS = 1
# wrk's default (2 s) would count a slow answer as a timeout and leave it out of the latencies.
WRK_TIMEOUT = f"{kit.REQUEST_TIMEOUT_S:.0f}s"
WRK_PERCENTILES = (50, 75, 90, 99, 99.9)
WRK_LINE_PREFIX = "bench "
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
APT_TIMEOUT_S = 600.0
APT_OUTPUT_TAIL = 1500

MS = 1000.0
# Columns of the output when it goes to a file or a pipe (rich's default there is 80, which wraps the grids).
OUTPUT_WIDTH = 120
# Rows of the SQL table: (label, key in the services' counts).
SQL_ROWS = (
    ("write transactions", "transactions.write"),
    ("read transactions", "transactions.read"),
    ("rolled-back writes", "transactions.rolled_back_write"),
    ("statements", "statements"),
    ("  select", "statements.select"),
    ("  insert", "statements.insert"),
    ("  update", "statements.update"),
    ("  delete", "statements.delete"),
)
SQL_SIDES = (("gateway", "gateway"), ("workers", "worker"))
CPU_COMPONENTS = ("kafka", "gateway", "worker", "progress", "run", "postgres")

# The wrk script. `response()` counts the answers by status in each thread (202 is only one of the 2xx),
# and `done()` prints them, with the latency percentiles in microseconds, as lines for parse_wrk().
WRK_SCRIPT = string.Template("""\
wrk.method = "POST"
wrk.body = $body
wrk.headers["Content-Type"] = $content_type
wrk.headers["Authorization"] = $authorization

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local function say(...)
  io.write("$prefix", string.format(...), "\\n")
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  for status, n in pairs(totals) do
    say("status %d %d", status, n)
  end
  for _, p in ipairs({$percentiles}) do
    say("latency_us p%s %.0f", tostring(p), latency:percentile(p))
  end
  say("latency_us max %.0f", latency.max)
  say("latency_us mean %.0f", latency.mean)
  say("duration_us %.0f", summary.duration)
  say("requests %.0f", summary.requests)
  for kind, n in pairs(summary.errors) do
    say("error %s %.0f", kind, n)
  end
end
""")


class SetupError(RuntimeError):
    """Something the benchmark needs before it starts is missing (wrk)."""


# --- figures ------------------------------------------------------------------------------------------


@dataclass
class Figures(kit.StackFigures):
    warmup: dict[str, Any] = field(default_factory=dict)
    accept: dict[str, Any] = field(default_factory=dict)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    open_loop: list[dict[str, Any]] = field(default_factory=list)
    # Per phase: load average, CPU per job by component, the load generator's CPU, SQL per job by side.
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class Sent:
    """One accepted request: its job, when it was written (`time.time()`), and when its 202 came back."""

    job_id: str
    sent_at: float
    answered_at: float
    scheduled_at: float | None = None

    @property
    def accept_s(self) -> float:
        return self.answered_at - self.sent_at


@dataclass
class Load:
    """What a Python-driven load sent: the accepted requests, and every answer's outcome."""

    sent: list[Sent]
    outcomes: Counter[str]
    wall_s: float
    peak_connections: int
    waited_for_connection: int


@dataclass
class Probe:
    """The state at a phase's start, to subtract at its end."""

    load_avg: float
    started: float  # perf_counter
    cpu: dict[str, float]
    client_cpu_s: float
    sql: kit.SqlCounts
    finished: int  # jobs already finished in the database


@dataclass
class Drain:
    finished: int  # jobs that finished since the phase started
    unfinished: int
    timed_out: bool
    last_finish: float | None  # the latest finished_at in the database (POSIX seconds)


@dataclass
class WrkRun:
    command: list[str]
    statuses: dict[int, int]
    latency_us: dict[str, float]
    duration_s: float
    requests: int
    errors: dict[str, int]
    cpu_s: float | None
    ended_at: float  # time.time() when wrk was seen to exit
    exit_code: int
    output: Path


# --- wrk --------------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The path of wrk, installed first from Debian's packages if it is missing."""
    found = shutil.which(WRK_PACKAGE)
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise SetupError("wrk is not installed, and there is no apt-get to install it with")
    kit.console.print(
        f"wrk is not installed: installing Debian's package (apt-get install -y {WRK_PACKAGE})..."
    )
    if not apt_get("install", "-y", WRK_PACKAGE):
        kit.console.print("That failed; running apt-get update, then trying again...")
        apt_get("update")
        apt_get("install", "-y", WRK_PACKAGE)
    found = shutil.which(WRK_PACKAGE)
    if not found:
        raise SetupError(f"could not install wrk (apt-get install -y {WRK_PACKAGE} failed; see above)")
    kit.console.print(f"wrk installed: {found}")
    return found


def apt_get(*words: str) -> bool:
    command = ["apt-get", *words]
    try:
        result = subprocess.run(
            command,
            env={**os.environ, **APT_ENV},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        kit.console.print(f"[red]{shlex.join(command)}: {exc}[/red]")
        return False
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-APT_OUTPUT_TAIL:]
        kit.console.print(f"{shlex.join(command)} exited with status {result.returncode}:", style="red")
        kit.console.print(output, markup=False)
    return result.returncode == 0


def wrk_version(wrk: str) -> str:
    try:
        result = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    words = (result.stdout or result.stderr).split()
    return " ".join(words[:2]) if words else "?"


def lua_string(value: str) -> str:
    """`value` as a Lua long-bracket literal, which takes every character as it is."""
    level = 0
    while f"]{'=' * level}]" in value:
        level += 1
    return f"[{'=' * level}[{value}]{'=' * level}]"


def write_wrk_script(path: Path, key: str) -> Path:
    path.write_text(
        WRK_SCRIPT.substitute(
            body=lua_string(JOB_BODY.decode()),
            content_type=lua_string(CONTENT_TYPE),
            authorization=lua_string(f"Bearer {key}"),
            prefix=WRK_LINE_PREFIX,
            percentiles=", ".join(str(p) for p in WRK_PERCENTILES),
        )
    )
    return path


def wrk_command(wrk: str, script: Path, url: str, seconds: int, connections: int) -> list[str]:
    return [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(script),
        url + JOBS_PATH,
    ]


def start_process(command: Sequence[str], output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


async def exit_cpu_s(pid: int) -> float | None:
    """Wait for the child `pid` to exit without reaping it, then read the CPU it used from /proc, which
    still holds it while the process is a zombie."""
    await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    stat = kit.proc_stat(pid)
    return stat[1] if stat is not None else None


async def run_wrk(command: list[str], output: Path) -> WrkRun:
    process = start_process(command, output)
    try:
        cpu_s = await exit_cpu_s(process.pid)
        ended_at = time.time()
        exit_code = process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()
    return parse_wrk(command, output, cpu_s, ended_at, exit_code)


def parse_wrk(command: list[str], output: Path, cpu_s: float | None, ended_at: float, code: int) -> WrkRun:
    """The figures that the script's done() printed (lines starting with WRK_LINE_PREFIX)."""
    run = WrkRun(command, {}, {}, 0.0, 0, {}, cpu_s, ended_at, code, output)
    for line in output.read_text(errors="replace").splitlines():
        if not line.startswith(WRK_LINE_PREFIX):
            continue
        words = line[len(WRK_LINE_PREFIX) :].split()
        match words:
            case ["status", status, n]:
                run.statuses[int(status)] = int(n)
            case ["latency_us", name, value]:
                run.latency_us[name] = float(value)
            case ["duration_us", value]:
                run.duration_s = float(value) / 1e6
            case ["requests", n]:
                run.requests = int(n)
            case ["error", kind, n]:
                run.errors[kind] = int(n)
    return run


# --- the Python load generator ----------------------------------------------------------------------------


Exchange = Callable[[bytes], Awaitable[tuple[int, bytes]]]


def cpu_time() -> float:
    """CPU seconds of the benchmark process (the Python load generator) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def send_one(
    exchange: Exchange, request: bytes, outcomes: Counter[str], scheduled_at: float | None = None
) -> Sent | None:
    """One POST; the Sent record if it was accepted (202 with the job's id), and its outcome counted."""
    sent_at = time.time()
    try:
        async with asyncio.timeout(kit.REQUEST_TIMEOUT_S):
            status, body = await exchange(request)
    except (kit.HttpError, OSError, TimeoutError) as exc:
        outcomes[type(exc).__name__] += 1
        return None
    answered_at = time.time()
    outcomes[str(status)] += 1
    if status != ACCEPTED:
        return None
    try:
        job_id = str(json.loads(body)["id"])
    except (ValueError, KeyError, TypeError):
        outcomes["202 without an id"] += 1
        return None
    return Sent(job_id, sent_at, answered_at, scheduled_at)


async def closed_loop(host: str, port: int, request: bytes, count: int, connections: int) -> Load:
    """`count` requests from `connections` loops, each sending its next as soon as its last is answered."""
    pool = kit.ConnectionPool(host, port, connections)
    await pool.fill(min(connections, count))
    numbers = iter(range(count))
    sent: list[Sent] = []
    outcomes: Counter[str] = Counter()

    async def loop() -> None:
        for _ in numbers:  # shared iterator: each number goes to exactly one loop
            if (one := await send_one(pool.exchange, request, outcomes)) is not None:
                sent.append(one)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(loop() for _ in range(min(connections, count))))
    finally:
        pool.close()
    return Load(sent, outcomes, time.perf_counter() - started, pool.peak, pool.waited)


async def open_loop(host: str, port: int, request: bytes, rate: float, seconds: float, cap: int) -> Load:
    """Requests at `rate` per second for `seconds`, each sent at its time (t0 + i / rate) whatever the
    earlier ones take, on a free connection of a pool that grows up to `cap` when all are busy."""
    pool = kit.ConnectionPool(host, port, cap)
    await pool.fill(OPEN_LOOP_FIRST_CONNECTIONS)
    outcomes: Counter[str] = Counter()
    count = max(1, round(rate * seconds))
    start = time.perf_counter() + OPEN_LOOP_LEAD_S
    start_wall = time.time() + OPEN_LOOP_LEAD_S
    tasks: list[asyncio.Task[Sent | None]] = []
    try:
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            send = send_one(pool.exchange, request, outcomes, scheduled_at=start_wall + i / rate)
            tasks.append(asyncio.create_task(send))
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        pool.close()
    sent = [one for one in results if one is not None]
    return Load(sent, outcomes, time.perf_counter() - start, pool.peak, pool.waited)


# --- figures from the database's timestamps -------------------------------------------------------------


def ms_quantiles(values: Sequence[float]) -> dict[str, float | None]:
    return kit.quantiles(values, MS)


def latency_figures(sent: Sequence[Sent], jobs: dict[str, kit.JobTimes]) -> dict[str, Any]:
    """Accept latency (client), end to end (client send -> finished_at), server side (created_at ->
    finished_at) and queue wait (created_at -> started_at), over the accepted jobs that finished."""
    e2e: list[float] = []
    server: list[float] = []
    queue: list[float] = []
    for one in sent:
        job = jobs.get(one.job_id)
        if job is None or job.finished is None:
            continue
        e2e.append(job.finished - one.sent_at)
        server.append(job.finished - job.created)
        if job.started is not None:
            queue.append(job.started - job.created)
    return {
        "accept_ms": ms_quantiles([one.accept_s for one in sent]),
        "e2e_ms": ms_quantiles(e2e),
        "server_ms": ms_quantiles(server),
        "queue_wait_ms": ms_quantiles(queue),
    }


def rate_figures(sent: Sequence[Sent], jobs: dict[str, kit.JobTimes]) -> dict[str, Any]:
    """Jobs per second over the steady window (the jobs that finished between the STEADY_WINDOW
    percentiles of the finish times, over the window's length), and from the first send to the last finish."""
    finishes = sorted(job.finished for job in jobs.values() if job.finished is not None)
    if not finishes or not sent:
        return {"steady_rate_per_s": None, "overall_rate_per_s": None}
    low_p, high_p = STEADY_WINDOW
    low, high = kit.percentile(finishes, low_p), kit.percentile(finishes, high_p)
    assert low is not None and high is not None
    in_window = sum(1 for moment in finishes if low <= moment <= high)
    first_send = min(one.sent_at for one in sent)
    span_s = finishes[-1] - first_send
    return {
        "steady_window": f"p{low_p}-p{high_p} of finish times",
        "steady_window_s": round(high - low, 3),
        "steady_window_jobs": in_window,
        "steady_rate_per_s": round(in_window / (high - low), 1) if high > low else None,
        "first_send_to_last_finish_s": round(span_s, 3),
        "overall_rate_per_s": round(len(finishes) / span_s, 1) if span_s > 0 else None,
        "drain_after_last_accept_s": round(finishes[-1] - max(one.answered_at for one in sent), 3),
    }


def outcome_figures(load: Load) -> dict[str, Any]:
    errors = {kind: n for kind, n in sorted(load.outcomes.items()) if kind != str(ACCEPTED)}
    return {
        "requests": sum(load.outcomes.values()),
        "accepted": len(load.sent),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "peak_connections": load.peak_connections,
        "waited_for_a_connection": load.waited_for_connection,
    }


def status_figures(jobs: dict[str, kit.JobTimes], accepted: int) -> dict[str, Any]:
    statuses = Counter(job.status for job in jobs.values())
    return {"statuses": dict(sorted(statuses.items())), "missing_in_database": accepted - len(jobs)}


# --- the run ------------------------------------------------------------------------------------------------


class Bench:
    """What every phase uses: the gateway, the key, the started stack, the database, the figures."""

    def __init__(
        self,
        args: argparse.Namespace,
        figures: Figures,
        url: str,
        key: str,
        stack: kit.EmbeddedStack | None,
        postgres: kit.EmbeddedPostgres | None,
    ) -> None:
        self.args = args
        self.figures = figures
        self.url = url
        self.key = key
        self.stack = stack
        self.postgres = postgres
        self.host, self.port = kit.host_port(url)
        headers = {"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {key}"}
        self.request = kit.http_request(url, "POST", JOBS_PATH, JOB_BODY, headers)
        read_url = stack.read_url if stack is not None else args.database_url
        self.db = kit.JobsDatabase(read_url) if read_url else None
        # Where the wrk script and wrk's output go: the stack's folder, or a folder of our own for --url.
        self.own_dir: Path | None = None
        if stack is not None:
            self.work_dir = stack.root
        else:
            self.work_dir = self.own_dir = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))

    def remove_own_dir(self) -> None:
        if self.own_dir is None:
            return
        if self.args.keep_data:
            kit.console.print(f"wrk's script and output kept in {self.own_dir}")
        else:
            shutil.rmtree(self.own_dir, ignore_errors=True)

    # -- resources

    def cpu(self) -> dict[str, float]:
        used = kit.stack_cpu(self.stack.pid) if self.stack is not None and self.stack.pid else {}
        if self.postgres is not None and (pid := self.postgres.pid) is not None:
            used["postgres"] = kit.tree_cpu(pid)
        return used

    def sql(self) -> kit.SqlCounts:
        return kit.read_sql_stats(self.stack.sql_stats_dir if self.stack is not None else None)

    async def finished_now(self) -> int:
        return kit.finished_count(await self.db.status_counts()) if self.db is not None else 0

    async def begin_phase(self) -> Probe:
        return Probe(
            load_avg=os.getloadavg()[0],
            started=time.perf_counter(),
            cpu=self.cpu(),
            client_cpu_s=cpu_time(),
            sql=self.sql(),
            finished=await self.finished_now(),
        )

    async def end_phase(
        self, name: str, probe: Probe, jobs: int, loadgen: str, loadgen_cpu_s: float | None = None
    ) -> dict[str, Any]:
        """The phase's resources per job (CPU now; SQL once the services have written their counts)."""
        wall_s = time.perf_counter() - probe.started
        cpu_after = self.cpu()
        if loadgen_cpu_s is None:
            loadgen_cpu_s = cpu_time() - probe.client_cpu_s
        await asyncio.sleep(SQL_STATS_SETTLE_S)
        sql = kit.sql_stats_delta(probe.sql, self.sql())
        figures = resource_figures(probe, cpu_after, wall_s, jobs, loadgen, loadgen_cpu_s, sql)
        self.figures.resources[name] = figures
        return figures

    # -- waiting for the jobs

    async def drain(self, probe: Probe, accepted: int, label: str) -> Drain:
        """Count finished jobs about once a second until every job is finished and at least `accepted`
        have finished since the phase began, or the deadline (--wait-timeout) passes."""
        assert self.db is not None
        deadline = time.monotonic() + self.args.wait_timeout
        next_report = time.monotonic() + PROGRESS_EVERY_S
        while True:
            counts = await self.db.status_counts()
            done = kit.finished_count(counts) - probe.finished
            unfinished = sum(counts.values()) - kit.finished_count(counts)
            if unfinished == 0 and done >= accepted:
                return Drain(done, 0, False, await self.db.last_finish())
            now = time.monotonic()
            if now >= deadline:
                kit.console.print(
                    f"[red]{label}: deadline of {self.args.wait_timeout:.0f} s hit with {unfinished:,} jobs "
                    "unfinished; the figures cover the finished ones, and the next phase overlaps[/red]"
                )
                return Drain(done, unfinished, True, await self.db.last_finish())
            if now >= next_report:
                kit.console.print(f"  {label}: {done:,} finished, {unfinished:,} to go", style="dim")
                next_report = now + PROGRESS_EVERY_S
            await asyncio.sleep(COMPLETION_POLL_S)

    async def job_times(self, sent: Sequence[Sent]) -> dict[str, kit.JobTimes]:
        assert self.db is not None
        return {job.id: job for job in await self.db.job_times([one.job_id for one in sent])}


def resource_figures(
    probe: Probe,
    cpu_after: dict[str, float],
    wall_s: float,
    jobs: int,
    loadgen: str,
    loadgen_cpu_s: float | None,
    sql: dict[str, dict[str, int]],
) -> dict[str, Any]:
    used = {name: cpu_after[name] - probe.cpu.get(name, 0.0) for name in cpu_after}
    total = sum(used.values())
    cores = os.cpu_count() or 1

    def per_job_ms(seconds: float | None) -> float | None:
        return round(seconds * MS / jobs, 3) if seconds is not None and jobs else None

    return {
        "load_avg_before": round(probe.load_avg, 2),
        "jobs": jobs,
        "wall_s": round(wall_s, 2),
        "stack_cpu_s": {name: round(value, 2) for name, value in sorted(used.items())},
        "stack_cpu_ms_per_job": {name: per_job_ms(value) for name, value in sorted(used.items())},
        "stack_cpu_ms_per_job_total": per_job_ms(total) if used else None,
        "stack_machine_share": round(total / (wall_s * cores), 3) if used and wall_s > 0 else None,
        "loadgen": loadgen,
        "loadgen_cpu_s": kit.rounded(loadgen_cpu_s, 2),
        "loadgen_cpu_ms_per_job": per_job_ms(loadgen_cpu_s),
        "sql_per_job": {
            side: {key: round(n / jobs, 3) for key, n in sorted(counts.items())} if jobs else {}
            for side, counts in sql.items()
        },
    }


# --- the phases ------------------------------------------------------------------------------------------


async def warm_up(bench: Bench) -> None:
    """A few jobs, submitted and waited for, so that the workers have joined their consumer group."""
    args = bench.args
    kit.console.print(f"Warm-up: {args.warmup} jobs...")
    probe = await bench.begin_phase()
    load = await closed_loop(bench.host, bench.port, bench.request, args.warmup, args.connections)
    drain = await bench.drain(probe, len(load.sent), "warm-up") if bench.db is not None else None
    bench.figures.warmup = {
        "jobs": args.warmup,
        "accepted": len(load.sent),
        "finished": drain.finished if drain else None,
        "seconds": round(time.perf_counter() - probe.started, 2),
    }
    errors = outcome_figures(load)["error_kinds"]
    bench.figures.warmup["errors"] = errors
    kit.console.print(
        f"Warm-up: {len(load.sent)}/{args.warmup} accepted"
        + (f", {drain.finished} finished" if drain else "")
        + f" in {bench.figures.warmup['seconds']:.1f} s"
        + (f" [red](errors: {kinds(errors)})[/red]" if errors else "")
    )


async def accept_phase(bench: Bench, wrk: str) -> None:
    args = bench.args
    script = write_wrk_script(bench.work_dir / "post-job.lua", bench.key)
    command = wrk_command(wrk, script, bench.url, args.accept_seconds, args.connections)
    kit.console.print(f"Phase 1, accept: {shlex.join(command)}")
    probe = await bench.begin_phase()
    run = await run_wrk(command, bench.work_dir / "wrk.out")
    if run.exit_code != 0 or not run.statuses:
        kit.console.print(f"[red]wrk exited with status {run.exit_code}; its output ({run.output}):[/red]")
        kit.console.print(run.output.read_text(errors="replace"), markup=False)
    figures = accept_figures(run)
    jobs = figures["accepted"]
    if bench.db is not None:
        await asyncio.sleep(COMPLETION_POLL_S)  # requests in flight when wrk stopped may still commit
        drain = await bench.drain(probe, figures["accepted"], "accept")
        jobs = drain.finished
        figures |= {
            "jobs_finished": drain.finished,
            "beyond_202s": drain.finished - figures["accepted"],
            "unfinished": drain.unfinished,
            "drain_after_wrk_s": kit.rounded(drain.last_finish - run.ended_at, 2)
            if drain.last_finish
            else None,
        }
    bench.figures.accept = figures
    print_accept(figures)
    await bench.end_phase("accept", probe, jobs, "wrk", run.cpu_s)


def accept_figures(run: WrkRun) -> dict[str, Any]:
    accepted = run.statuses.get(ACCEPTED, 0)
    return {
        "command": shlex.join(run.command),
        "exit_code": run.exit_code,
        "requests": run.requests,
        "accepted": accepted,
        "other_statuses": {
            str(status): n for status, n in sorted(run.statuses.items()) if status != ACCEPTED
        },
        "socket_errors": {kind: n for kind, n in sorted(run.errors.items()) if kind != "status" and n},
        "duration_s": round(run.duration_s, 3),
        "accepted_per_s": round(accepted / run.duration_s, 1) if run.duration_s > 0 else None,
        "latency_ms": {name: round(us / MS, 2) for name, us in run.latency_us.items()},
        "wrk_cpu_s": kit.rounded(run.cpu_s, 2),
        "wrk_core_share": round(run.cpu_s / run.duration_s, 3) if run.cpu_s and run.duration_s else None,
    }


async def end_to_end_phase(bench: Bench) -> None:
    args = bench.args
    kit.console.print(
        f"Phase 2, end to end: {args.jobs:,} jobs over {args.connections} connections (closed loop)..."
    )
    probe = await bench.begin_phase()
    load = await closed_loop(bench.host, bench.port, bench.request, args.jobs, args.connections)
    kit.console.print(
        f"  {len(load.sent):,} accepted in {load.wall_s:.1f} s; waiting for them to finish...", style="dim"
    )
    drain = await bench.drain(probe, len(load.sent), "end to end")
    jobs = await bench.job_times(load.sent)
    figures = {
        **outcome_figures(load),
        "submit_wall_s": round(load.wall_s, 3),
        "accepted_per_s": round(len(load.sent) / load.wall_s, 1) if load.wall_s > 0 else None,
        **status_figures(jobs, len(load.sent)),
        "unfinished": drain.unfinished,
        **rate_figures(load.sent, jobs),
        **latency_figures(load.sent, jobs),
    }
    bench.figures.end_to_end = figures
    print_end_to_end(figures)
    await bench.end_phase("e2e", probe, drain.finished, "python client")


async def open_loop_phase(bench: Bench, rate: float) -> None:
    args = bench.args
    kit.console.print(f"Phase 3, open loop: {rate:g} jobs/s for {args.open_seconds:g} s...")
    probe = await bench.begin_phase()
    load = await open_loop(
        bench.host, bench.port, bench.request, rate, args.open_seconds, args.open_max_connections
    )
    drain = await bench.drain(probe, len(load.sent), f"open loop {rate:g}/s")
    jobs = await bench.job_times(load.sent)
    lags = [one.sent_at - one.scheduled_at for one in load.sent if one.scheduled_at is not None]
    sending_s = sending_seconds(load.sent)
    figures = {
        "offered_per_s": rate,
        "seconds": args.open_seconds,
        **outcome_figures(load),
        "achieved_per_s": round(len(load.sent) / sending_s, 1) if sending_s > 0 else None,
        "send_lag_ms": ms_quantiles(lags),
        **status_figures(jobs, len(load.sent)),
        "unfinished": drain.unfinished,
        **rate_figures(load.sent, jobs),
        **latency_figures(load.sent, jobs),
    }
    bench.figures.open_loop.append(figures)
    kit.console.print(
        f"  {rate:g}/s: {len(load.sent):,} accepted, {figures['errors']:,} errors, e2e p50/p99 "
        f"{kit.fmt(figures['e2e_ms']['p50'])} / {kit.fmt(figures['e2e_ms']['p99'])} ms",
        style="dim",
    )
    await bench.end_phase(open_label(rate), probe, drain.finished, "python client")


def sending_seconds(sent: Sequence[Sent]) -> float:
    """From the first send to the last 202; 0 when nothing was accepted."""
    if not sent:
        return 0.0
    return max(one.answered_at for one in sent) - min(one.sent_at for one in sent)


def open_label(rate: float) -> str:
    return f"open {rate:g}/s"


async def run_benchmark(bench: Bench, wrk: str) -> None:
    """Every phase asked for, in order, on the `bench` its caller built from the run's parameters."""
    args, figures = bench.args, bench.figures
    try:
        if bench.db is None:
            skip(figures, "end to end and open loop: they need the database (--database-url with --url)")
        if args.warmup:
            await warm_up(bench)
        if "accept" in args.phases:
            await accept_phase(bench, wrk)
        if bench.db is not None and "e2e" in args.phases:
            await end_to_end_phase(bench)
        if bench.db is not None and "open" in args.phases:
            for rate in args.rates:
                await open_loop_phase(bench, rate)
            print_open_loop(figures.open_loop)
    finally:
        if figures.resources:
            why_no_sql = (
                "the stack wrote no files into CONVEYOR_SQL_STATS_DIR (an older stack?)"
                if bench.stack is not None
                else "they need a stack started by the benchmark"
            )
            print_resources(figures.resources, why_no_sql)
        if bench.db is not None:
            await bench.db.close()
        bench.remove_own_dir()


def skip(figures: Figures, what: str) -> None:
    kit.console.print(f"[yellow]Skipped: {what}.[/yellow]")
    figures.skipped.append(what)


# --- output ---------------------------------------------------------------------------------------------


def slash(values: Sequence[float | int | None], digits: int = 1) -> str:
    return " / ".join(kit.fmt(value, digits) for value in values)


def kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n:,}" for kind, n in counts.items())


def print_header(settings: dict[str, Any]) -> None:
    connections, open_s = settings["connections"], settings["open_seconds"]
    rows = [
        ("gateway", str(settings["gateway"]), str(settings["gateway_origin"])),
        ("database", str(settings["database"]), str(settings["database_origin"])),
        ("workers", str(settings["workers"]), f"{settings['worker_concurrency']} jobs each at once"),
        ("job type", JOB_TYPE, ""),
        ("phases", ", ".join(settings["phases"]), f"(+{settings['warmup']} warm-up jobs)"),
        ("accept", f"{settings['accept_seconds']} s", f"{settings['wrk']}, {connections} connections"),
        ("end to end", kit.fmt(settings["jobs"]), f"jobs over {connections} connections"),
        ("open loop", ", ".join(f"{r:g}" for r in settings["rates"]), f"jobs/s, {open_s:g} s each"),
        kit.machine_row(settings),
        ("client", str(settings["client_loop"]), "event loop of the Python load generator"),
    ]
    kit.print_header_table("Throughput benchmark", rows, settings)


def print_accept(fig: dict[str, Any]) -> None:
    lat = fig["latency_ms"]
    rows = [
        ("requests answered", kit.fmt(fig["requests"]), f"in {fig['duration_s']:.2f} s"),
        ("202 Accepted", kit.fmt(fig["accepted"]), ""),
        ("other statuses", kit.fmt(sum(fig["other_statuses"].values())), kinds(fig["other_statuses"])),
        ("socket errors", kit.fmt(sum(fig["socket_errors"].values())), kinds(fig["socket_errors"])),
        ("accepted rate", kit.fmt(fig["accepted_per_s"]), "202s/s"),
        (
            "latency p50 / p75 / p90 / p99",
            slash([lat.get(f"p{p}") for p in (50, 75, 90, 99)], 2),
            "ms (wrk, every answer)",
        ),
        ("latency p99.9 / max", slash([lat.get("p99.9"), lat.get("max")], 2), "ms"),
        ("wrk CPU", kit.fmt(fig["wrk_cpu_s"], 2), f"s ({kit.fmt(pct(fig['wrk_core_share']))}% of a core)"),
    ]
    if "jobs_finished" in fig:
        rows += [
            ("jobs finished", kit.fmt(fig["jobs_finished"]), f"({fig['beyond_202s']:+,} beyond the 202s)"),
            ("drain after wrk stopped", kit.fmt(fig["drain_after_wrk_s"], 2), "s (to the last finished_at)"),
        ]
    kit.console.print(kit.table("Phase 1: accept (wrk, closed loop, POST /v1/jobs)", rows))


def pct(share: float | None) -> float | None:
    return None if share is None else share * 100


def print_end_to_end(fig: dict[str, Any]) -> None:
    missing, span = fig["missing_in_database"], kit.fmt(fig.get("first_send_to_last_finish_s"), 2)
    rows = [
        ("accepted", kit.fmt(fig["accepted"]), f"of {fig['requests']:,} requests"),
        ("errors", kit.fmt(fig["errors"]), kinds(fig["error_kinds"])),
        ("submit", kit.fmt(fig["submit_wall_s"], 2), f"s ({kit.fmt(fig['accepted_per_s'])} 202s/s)"),
        (
            "statuses",
            kinds(fig["statuses"]),
            f"unfinished {fig['unfinished']:,}, not in the database {missing:,}",
        ),
        ("steady rate", kit.fmt(fig["steady_rate_per_s"]), f"jobs/s ({steady_about(fig)})"),
        ("overall rate", kit.fmt(fig["overall_rate_per_s"]), f"jobs/s (first send to last finish: {span} s)"),
        ("drain after last 202", kit.fmt(fig.get("drain_after_last_accept_s"), 2), "s"),
        *latency_rows(fig),
    ]
    kit.console.print(kit.table("Phase 2: end to end (closed loop, Python client)", rows))


def steady_about(fig: dict[str, Any]) -> str:
    if fig.get("steady_window_s") is None:
        return "no jobs"
    jobs, seconds, window = fig["steady_window_jobs"], fig["steady_window_s"], fig["steady_window"]
    return f"{jobs:,} jobs finished in {seconds:.2f} s, {window}"


def latency_rows(fig: dict[str, Any]) -> list[tuple[str, str, str]]:
    def row(label: str, key: str, about: str) -> tuple[str, str, str]:
        q = fig[key]
        return (f"{label} p50 / p90 / p99", slash([q["p50"], q["p90"], q["p99"]]), f"ms ({about})")

    return [
        row("accept", "accept_ms", "send -> 202 read"),
        row("end to end", "e2e_ms", "client send -> finished_at"),
        row("server side", "server_ms", "created_at -> finished_at"),
        row("queue wait", "queue_wait_ms", "created_at -> started_at"),
    ]


def print_open_loop(runs: Sequence[dict[str, Any]]) -> None:
    if not runs:
        return

    def line(label: str, value: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, *(value(run) for run in runs)]

    def q(key: str, name: str) -> Callable[[dict[str, Any]], str]:
        return lambda run: kit.fmt(run[key][name])

    rows = [
        line("sent / accepted", lambda r: f"{r['requests']:,} / {r['accepted']:,}"),
        line("errors", lambda r: kit.fmt(r["errors"])),
        line("achieved, 202s/s", lambda r: kit.fmt(r["achieved_per_s"])),
        line("finished, jobs/s (steady)", lambda r: kit.fmt(r["steady_rate_per_s"])),
        line("send lag p99, ms", q("send_lag_ms", "p99")),
        line("connections (peak)", lambda r: kit.fmt(r["peak_connections"])),
        line("accept p50, ms", q("accept_ms", "p50")),
        line("accept p99, ms", q("accept_ms", "p99")),
        line("end to end p50, ms", q("e2e_ms", "p50")),
        line("end to end p99, ms", q("e2e_ms", "p99")),
        line("queue wait p50, ms", q("queue_wait_ms", "p50")),
        line("queue wait p99, ms", q("queue_wait_ms", "p99")),
        line("unfinished", lambda r: kit.fmt(r["unfinished"])),
    ]
    headers = ["offered, jobs/s", *(f"{run['offered_per_s']:g}" for run in runs)]
    kit.console.print(kit.grid("Phase 3: open loop", headers, rows))
    kit.console.print(
        "  end to end: client send -> finished_at; queue wait: created_at -> started_at", style="dim"
    )
    errors = {f"{run['offered_per_s']:g}/s": run["error_kinds"] for run in runs if run["error_kinds"]}
    for rate, counts in errors.items():
        kit.console.print(f"  errors at {rate}: {kinds(counts)}", style="yellow")


def print_resources(resources: dict[str, dict[str, Any]], why_no_sql: str) -> None:
    kit.console.print()
    phases = list(resources.values())

    def line(
        label: str, value: Callable[[dict[str, Any]], float | int | str | None], digits: int = 2
    ) -> list[str]:
        return [label, *(v if isinstance(v := value(phase), str) else kit.fmt(v, digits) for phase in phases)]

    components = [name for name in CPU_COMPONENTS if any(name in p["stack_cpu_ms_per_job"] for p in phases)]
    rows = [
        line("load average before", lambda p: p["load_avg_before"]),
        line("jobs", lambda p: p["jobs"]),
        line("wall s (with drain)", lambda p: p["wall_s"], 1),
        line("stack CPU, % of machine", lambda p: pct(p["stack_machine_share"]), 0),
        line("stack CPU ms/job", lambda p: p["stack_cpu_ms_per_job_total"]),
        *(line(f"  {name}", cpu_getter(name)) for name in components),
        line("load generator", lambda p: p["loadgen"]),
        line("  CPU ms/job", lambda p: p["loadgen_cpu_ms_per_job"]),
    ]
    for side_label, side in SQL_SIDES:
        rows += [line(f"{side_label}: {label}/job", sql_getter(side, key)) for label, key in SQL_ROWS]
    kit.console.print(kit.grid("Resources per job, by phase", ["", *resources], rows))
    kit.console.print(
        "  Per phase: first request to last job finished (drain included) / jobs finished.", style="dim"
    )
    if not any(phase["sql_per_job"] for phase in phases):
        kit.console.print(f"  No SQL counts: {why_no_sql}.", style="dim")


def cpu_getter(name: str) -> Callable[[dict[str, Any]], float | None]:
    def value(phase: dict[str, Any]) -> float | None:
        ms: float | None = phase["stack_cpu_ms_per_job"].get(name)
        return ms

    return value


def sql_getter(side: str, key: str) -> Callable[[dict[str, Any]], float | str]:
    """A phase's `key` per job on `side`, or "-" when the stack counted no SQL (an older stack)."""

    def value(phase: dict[str, Any]) -> float | str:
        counts = phase["sql_per_job"].get(side)
        return float(counts.get(key, 0.0)) if counts else "-"

    return value


# --- options and main ---------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: rates are numbers separated by commas") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more rates above 0")
    return rates


def parse_phases(text: str) -> list[str]:
    phases = [word.strip() for word in text.split(",") if word.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"{text!r}: phases are some of {','.join(PHASES)}")
    return phases


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = kit.new_parser(__doc__)
    kit.add_url_option(parser)
    kit.add_key_option(parser)
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the started stack's database: its default SQLite, or a PostgreSQL the benchmark starts",
    )
    target.add_argument(
        "--database-url", help="the stack's database (with --url: where to read the jobs' timestamps)"
    )
    kit.add_option(parser, "--workers", kit.DEFAULT_WORKERS, "worker processes to start")
    parser.add_argument(
        "--worker-concurrency", type=int, help="jobs per worker at once (CONVEYOR_WORKER_CONCURRENCY)"
    )
    parser.add_argument(
        "--phases", type=parse_phases, default=list(PHASES), help="phases to run (default accept,e2e,open)"
    )
    kit.add_option(parser, "--warmup", DEFAULT_WARMUP, "warm-up jobs, not measured")
    kit.add_option(parser, "--accept-seconds", DEFAULT_ACCEPT_SECONDS, "seconds of wrk in the accept phase")
    kit.add_option(parser, "--connections", DEFAULT_CONNECTIONS, "connections of the accept and e2e phases")
    kit.add_option(parser, "--jobs", DEFAULT_JOBS, "jobs of the end-to-end phase")
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=parse_rates(DEFAULT_RATES),
        help=f"offered rates of the open-loop phase, jobs/s (default {DEFAULT_RATES})",
    )
    kit.add_option(parser, "--open-seconds", DEFAULT_OPEN_SECONDS, "seconds of each open-loop rate")
    kit.add_option(parser, "--open-max-connections", DEFAULT_OPEN_MAX_CONNECTIONS, "open-loop connection cap")
    kit.add_stack_options(parser, DEFAULT_DRAIN_TIMEOUT_S, "seconds each phase waits for its jobs to finish")
    args = parser.parse_args(argv)
    kit.check_at_least_one(parser, args, ("accept_seconds", "connections", "jobs", "open_max_connections"))
    if args.warmup < 0 or args.workers < 0:
        parser.error("--warmup and --workers cannot be negative")
    if args.open_seconds <= 0:
        parser.error("--open-seconds must be above 0")
    if args.url and args.database == "postgresql" and not args.database_url:
        parser.error(
            "--database postgresql starts a database for a started stack: with --url, give --database-url"
        )
    kit.check_target(parser, args)
    return args


def settings_of(
    args: argparse.Namespace, url: str, postgres: kit.EmbeddedPostgres | None, wrk: str
) -> dict[str, Any]:
    external = bool(args.url)
    worker_concurrency: str | int = args.worker_concurrency or os.environ.get(
        "CONVEYOR_WORKER_CONCURRENCY", "8 (default)"
    )
    if postgres is not None:
        database, origin = "postgresql", f"started by the benchmark (port {postgres.server.port})"
    elif args.database_url:
        database, origin = kit.database_kind(args.database_url), "--database-url"
    else:
        database, origin = ("unknown", "not given") if external else ("sqlite", "the stack's default")
    return {
        "gateway": url,
        "gateway_origin": "external" if external else "started by the benchmark",
        "database": database,
        "database_origin": origin,
        "workers": "unknown" if external else args.workers,
        "worker_concurrency": "unknown" if external else worker_concurrency,
        "phases": args.phases,
        "warmup": args.warmup,
        "accept_seconds": args.accept_seconds,
        "connections": args.connections,
        "jobs": args.jobs,
        "rates": args.rates,
        "open_seconds": args.open_seconds,
        "open_max_connections": args.open_max_connections,
        "wrk": wrk_version(wrk),
        "client_loop": type(asyncio.get_event_loop_policy()).__module__.split(".")[0],
        **kit.machine_settings(),
        "load_avg_start": os.getloadavg()[0],
    }


def use_uvloop() -> None:
    """The Python load generator on uvloop when it is installed (it comes with uvicorn[standard])."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args: argparse.Namespace, postgres: kit.EmbeddedPostgres | None, wrk: str) -> int:
    """One benchmark run against the started stack (or --url), on `postgres` if there is one."""
    if postgres is not None:
        args.database_url = postgres.url

    def new_stack(args: argparse.Namespace) -> kit.EmbeddedStack:
        return kit.EmbeddedStack(args.workers, args.database_url, args.worker_concurrency, sql_stats=True)

    def new_figures(args: argparse.Namespace, url: str, stack: kit.EmbeddedStack | None) -> Figures:
        return Figures(settings_of(args, url, postgres, wrk))

    async def benchmark(
        args: argparse.Namespace, figures: Figures, url: str, key: str, stack: kit.EmbeddedStack | None
    ) -> None:
        await run_benchmark(Bench(args, figures, url, key, stack, postgres), wrk)

    return kit.run_main(args, new_stack, new_figures, print_header, benchmark)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wrk = ensure_wrk() if "accept" in args.phases else WRK_PACKAGE
    except SetupError as exc:
        kit.console.print(f"[red]{exc}[/red]")
        return kit.EXIT_STARTUP_FAILED
    use_uvloop()
    if not kit.console.is_terminal:
        kit.console.width = OUTPUT_WIDTH
    if args.database == "postgresql" and not args.url:
        return kit.run_with_postgres(args.keep_data, lambda postgres: run(args, postgres, wrk))
    return run(args, None, wrk)


if __name__ == "__main__":
    sys.exit(main())
