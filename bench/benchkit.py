"""What the benchmarks share: the embedded stack they start, their common options, and figure helpers.

`throughput.py` and `progress_fanout.py` measure different things against the same kind of stack, started
and stopped the same way; this module holds that part once, so that each script keeps only its own
measurements. It is a sibling module (the scripts run as ``python bench/<script>.py``, which puts this
folder first on ``sys.path``), not part of the conveyor package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import httpx
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, TextClause, bindparam, create_engine, make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conveyor.embedded.kafka import is_port_free

# The private PostgreSQL server is test support code, not part of the package: it lives beside the tests.
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from postgres_server import PostgresError, PostgresServer, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
READY_POLL_S = 0.25
STOP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40
# Below Linux's default ephemeral range (32768+), like the embedded Kafka's own port search.
PORT_RANGE = (20000, 32000)
PORT_TRIES = 500
DEFAULT_WORKERS = 2
DEFAULT_STARTUP_TIMEOUT_S = 180.0
BENCH_KEY_ENV = "CONVEYOR_BENCH_KEY"
UNLIMITED = 1_000_000_000
# Exit statuses of main(): 130 is what a shell reports for a command ended by Ctrl-C.
EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
EXIT_INTERRUPTED = 130

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# The services count their SQL into this folder when it is set (conveyor/sqlstats.py).
SQL_STATS_DIR_ENV = "CONVEYOR_SQL_STATS_DIR"
SQLITE_READ_TIMEOUT_S = 30.0
# Ids per `WHERE id IN (...)`: well below SQLite's limit on bound parameters.
ID_CHUNK = 500
POSTGRES_START_TIMEOUT_S = 120.0
# Others may traverse the folder, so that the server's OS user (postgres, when we are root) can keep its
# cluster in it rather than in a shadow folder under /tmp that removing ours would leave behind.
POSTGRES_ROOT_MODE = 0o711
POSTMASTER_PID_FILE = "postmaster.pid"
HTTP_READ_LIMIT = 1 << 16
QUANTILES = ("p50", "p90", "p99", "max")  # the keys of quantiles()

console = Console(highlight=False)


# --- figures and tables -------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0-100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def quantiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p90/p99/max of `values` times `scale` (1000 turns seconds into ms), rounded to 0.1."""
    top = max(values) if values else None
    return {
        "p50": rounded(scaled(percentile(values, 50), scale)),
        "p90": rounded(scaled(percentile(values, 90), scale)),
        "p99": rounded(scaled(percentile(values, 99), scale)),
        "max": rounded(scaled(top, scale)),
    }


def quantile_rows(
    name: str, values: Mapping[str, Any], unit: str, about: str, keys: Sequence[str] = QUANTILES
) -> list[tuple[str, str, str]]:
    """A table row per quantile of `values` (as quantiles() makes them), in the order of `keys`; what
    they measure (`about`) is said once, on the first row, so that the column stays readable."""
    return [
        (f"{name} {key}", fmt(values[key]), f"{unit} ({about})" if n == 0 else unit)
        for n, key in enumerate(keys)
    ]


def scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(title: str, rows: Sequence[tuple[str, str, str]]) -> Table:
    """A titled table of (figure, value, unit) rows, the layout of every benchmark table."""
    out = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False, pad_edge=False)
    out.add_column("figure")
    out.add_column("value", justify="right")
    out.add_column("unit")
    for row in rows:
        out.add_row(*row)
    return out


def grid(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A titled table with a header row: the first column names the figure, the others are right-aligned
    values (one column per phase, say)."""
    out = Table(title=title, title_justify="left", box=box.SIMPLE, pad_edge=False)
    for n, header in enumerate(headers):
        out.add_column(header, justify="left" if n == 0 else "right")
    for row in rows:
        out.add_row(*row)
    return out


def database_kind(url: str | None) -> str:
    if not url:
        return "sqlite"
    return url.split("://", 1)[0].split("+", 1)[0]


def machine_settings() -> dict[str, Any]:
    """The machine, for the header: the figures mean little without the cores and the load they shared."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": sys.platform,
        "python": sys.version.split()[0],
    }


def machine_row(settings: Mapping[str, Any], more: str = "") -> tuple[str, str, str]:
    """The header's row of the machine_settings() (cores, platform, Python), `more` after them."""
    return (
        "machine",
        f"{settings['cpu_count']} cores",
        f"{settings['platform']}, Python {settings['python']}{more}",
    )


def print_header_table(title: str, rows: Sequence[tuple[str, str, str]], settings: Mapping[str, Any]) -> None:
    """A benchmark's header: its own `rows`, then the load average before the run, last in every header,
    since the other work on the machine shares its CPUs with the stack."""
    load_average = (
        "load average",
        f"{settings['load_avg_start']:.2f}",
        "1 min, before the run (CPUs are shared)",
    )
    console.print(table(title, [*rows, load_average]))


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- processes (Linux /proc) ----------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far) of a live process, from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)"; comm may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def component(pid: int) -> str:
    """Which part of the stack a process is: kafka, or the `conveyor` command it runs."""
    words = proc_argv(pid)
    return named_component(words) or (Path(words[0]).name if words else "?")


def named_component(words: Sequence[str]) -> str | None:
    """kafka, or the `conveyor` command of a command line; None for any other command."""
    if words and words[0].endswith("java"):
        return "kafka"
    if "conveyor" in words:
        command = words[words.index("conveyor") + 1 :][:1]
        return command[0] if command else "conveyor"
    return None


def process_tree(root_pid: int) -> dict[int, float]:
    """CPU seconds used so far by `root_pid` and each of its live descendants, by pid."""
    if not Path("/proc").is_dir():
        return {}
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    tree = {root_pid}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def stack_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds per component (run, gateway, worker, progress, kafka) of `root_pid` and its children.

    A process with no component of its own (a child that multiprocessing spawned, whose command line is
    `python -c ...`) counts for its nearest ancestor that has one: a progress service running several
    processes counts as one `progress`."""
    cpu = process_tree(root_pid)
    names: dict[int, str] = {}

    def name_of(pid: int) -> str:
        if pid not in names:
            words = proc_argv(pid)
            name = named_component(words)
            if name is None:
                stat = proc_stat(pid)
                parent = stat[0] if stat is not None else None
                inherit = parent is not None and parent in cpu and parent != pid
                name = name_of(parent) if inherit and parent is not None else component(pid)
            names[pid] = name
        return names[pid]

    totals: dict[str, float] = {}
    for pid, cpu_s in cpu.items():
        name = name_of(pid)
        totals[name] = totals.get(name, 0.0) + cpu_s
    return totals


def tree_cpu(root_pid: int) -> float:
    """CPU seconds of `root_pid` and its live descendants (a PostgreSQL postmaster and its backends)."""
    return sum(process_tree(root_pid).values())


def spawn_conveyor(command: str, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`python -m conveyor <command>`, logging to `log`.

    Its own session: a Ctrl-C in the terminal reaches only the benchmark, which then stops its processes
    with SIGTERM and waits for them, so nothing is stopped twice at once.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor", command],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_or_kill(process: subprocess.Popen[bytes], on_timeout: str) -> int:
    """Wait up to STOP_TIMEOUT_S for `process` to exit, else print `on_timeout` and kill it; its status."""
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        console.print(f"[red]{on_timeout}[/red]")
        process.kill()
        return process.wait()


# --- the embedded stack ---------------------------------------------------------------------------------


def free_ports(count: int, taken: set[int]) -> int:
    """A base port from which `count` consecutive ports are free now and not in `taken`."""
    low, high = PORT_RANGE
    for _ in range(PORT_TRIES):
        base = random.randint(low, high - count)
        block = range(base, base + count)
        if not taken.intersection(block) and all(is_port_free(port) for port in block):
            taken.update(block)
            return base
    raise RuntimeError(f"no block of {count} free ports in {low}-{high}")


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
        SQL_STATS_DIR_ENV,
    )

    def __init__(
        self,
        workers: int | None,
        database_url: str | None,
        worker_concurrency: int | None,
        *,
        sql_stats: bool = False,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """`workers`: how many the supervisor runs (None: as many as its autoscaler wants, within
        `settings`' CONVEYOR_WORKERS_MIN and _MAX). `sql_stats`: have every process of the stack count
        its SQL into `sql_stats_dir`. `settings`: more CONVEYOR_ settings of the stack's."""
        self.workers = workers
        self.settings = dict(settings or {})
        self.database_url = database_url
        self.worker_concurrency = worker_concurrency
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "stack.log"
        self.sql_stats_dir = self.root / "sqlstats" if sql_stats else None
        taken: set[int] = set()
        self.kafka_port = free_ports(2, taken)  # the broker, and the controller on the port after it
        self.gateway_port = free_ports(1, taken)
        self.progress_port = free_ports(1, taken)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.gateway_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def read_url(self) -> str:
        """The stack's database, for reading it from the benchmark (its default is SQLite in data_dir)."""
        return self.database_url or f"sqlite:///{self.data_dir / 'conveyor.db'}"

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a process of this stack: its data folder and database, plus `settings`."""
        env = {key: value for key, value in os.environ.items() if key not in self.OVERRIDDEN}
        env.update(CONVEYOR_DATA_DIR=str(self.data_dir), CONVEYOR_HOST=LOCALHOST, PYTHONUNBUFFERED="1")
        env.update(settings)
        if self.database_url:
            env["CONVEYOR_DATABASE_URL"] = self.database_url
        if self.sql_stats_dir is not None:
            env[SQL_STATS_DIR_ENV] = str(self.sql_stats_dir)
        return env

    def start(self) -> None:
        env = self.env(
            CONVEYOR_KAFKA_PORT=str(self.kafka_port),
            CONVEYOR_GATEWAY_PORT=str(self.gateway_port),
            CONVEYOR_PROGRESS_PORT=str(self.progress_port),
            # The benchmarks measure capacity: the per-tenant limits would measure themselves instead.
            CONVEYOR_TENANT_SUBMIT_RATE=str(UNLIMITED),
            CONVEYOR_TENANT_SUBMIT_BURST=str(UNLIMITED),
            CONVEYOR_TENANT_MAX_QUEUED=str(UNLIMITED),
            # Nothing scrapes a benchmark's workers, and fixed ports would collide between two runs.
            CONVEYOR_WORKER_METRICS_PORT="0",
            CONVEYOR_RUN_METRICS_PORT="0",
        )
        if self.workers is not None:
            env["CONVEYOR_WORKERS"] = str(self.workers)
        if self.worker_concurrency is not None:
            env["CONVEYOR_WORKER_CONCURRENCY"] = str(self.worker_concurrency)
        env.update(self.settings)
        with self.log_path.open("wb") as log:
            self.process = spawn_conveyor("run", env, log)

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
            on_timeout = (
                f"`conveyor run` (pid {process.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s; "
                f"killing it; its services or Kafka may be left running (see {self.log_path})"
            )
            code = wait_or_kill(process, on_timeout)
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


# --- SQL counted by the services (conveyor/sqlstats.py) ---------------------------------------------------


SqlCounts = dict[str, dict[str, int]]


def read_sql_stats(folder: Path | None) -> SqlCounts:
    """The counts each process last wrote into `folder`, by file name (`<command>-<pid>`); {} if none."""
    if folder is None or not folder.is_dir():
        return {}
    found: SqlCounts = {}
    for path in sorted(folder.glob("*.json")):
        try:
            counts = json.loads(path.read_text())["counts"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced right now, or not one of ours
        found[path.stem] = {name: int(value) for name, value in counts.items()}
    return found


def sql_stats_delta(before: SqlCounts, after: SqlCounts) -> dict[str, dict[str, int]]:
    """What each kind of process (gateway, worker, progress, run) counted between two snapshots, summed
    over its processes; a process that appeared in between counts from zero."""
    sides: dict[str, Counter[str]] = {}
    for name, counts in after.items():
        command = name.rsplit("-", 1)[0]
        earlier = before.get(name, {})
        side = sides.setdefault(command, Counter())
        for key, value in counts.items():
            side[key] += value - earlier.get(key, 0)
    return {command: dict(counts) for command, counts in sorted(sides.items())}


# --- the jobs table, read apart from the services' code ------------------------------------------------


@dataclass(frozen=True)
class JobTimes:
    """One job's status and timestamps, as POSIX seconds (UTC, the machine's clock)."""

    id: str
    status: str
    created: float
    started: float | None
    finished: float | None


def epoch_seconds(value: datetime | str | None) -> float | None:
    """A stored timestamp as POSIX seconds: naive UTC, as a string (SQLite: `2026-12-01 09:00:00.123456`)
    or a datetime (PostgreSQL's `timestamp without time zone`)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


STATUS_COUNTS_SQL = text("SELECT status, count(*) FROM jobs GROUP BY status")
LAST_FINISH_SQL = text("SELECT max(finished_at) FROM jobs")
JOB_TIMES_SQL = text(
    "SELECT id, status, created_at, started_at, finished_at FROM jobs WHERE id IN :ids"
).bindparams(bindparam("ids", expanding=True))


class JobsDatabase:
    """Reads the stack's `jobs` table with SQLAlchemy Core: SQLite through the sync driver (in a thread,
    so that the event loop goes on), PostgreSQL through asyncpg."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        self.kind = backend
        self._sync: Engine | None = None
        self._async: AsyncEngine | None = None
        if backend == "sqlite":
            self._sync = create_engine(
                parsed.set(drivername="sqlite+pysqlite"),
                connect_args={"timeout": SQLITE_READ_TIMEOUT_S, "check_same_thread": False},
            )
        elif backend == "postgresql":
            self._async = create_async_engine(parsed.set(drivername="postgresql+asyncpg"), pool_size=2)
        else:
            raise ValueError(f"cannot read jobs from a {backend} database (SQLite or PostgreSQL only)")

    async def fetch(self, statement: TextClause, **params: Any) -> list[tuple[Any, ...]]:
        if self._async is not None:
            async with self._async.connect() as conn:
                return [tuple(row) for row in (await conn.execute(statement, params)).all()]
        return await asyncio.to_thread(self._fetch_sync, statement, params)

    def _fetch_sync(self, statement: TextClause, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return [tuple(row) for row in conn.execute(statement, dict(params)).all()]

    async def status_counts(self) -> dict[str, int]:
        """How many jobs there are in each status (one cheap query, whatever the number of jobs)."""
        return {str(status): int(n) for status, n in await self.fetch(STATUS_COUNTS_SQL)}

    async def last_finish(self) -> float | None:
        rows = await self.fetch(LAST_FINISH_SQL)
        return epoch_seconds(rows[0][0]) if rows else None

    async def job_times(self, ids: Sequence[str]) -> list[JobTimes]:
        """The jobs of `ids` that exist, read in chunks."""
        found: list[JobTimes] = []
        for start in range(0, len(ids), ID_CHUNK):
            rows = await self.fetch(JOB_TIMES_SQL, ids=list(ids[start : start + ID_CHUNK]))
            found += [job_times_of(row) for row in rows]
        return found

    async def close(self) -> None:
        if self._async is not None:
            await self._async.dispose()
        if self._sync is not None:
            self._sync.dispose()


def job_times_of(row: Sequence[Any]) -> JobTimes:
    job_id, status, created, started, finished = row
    created_s = epoch_seconds(created)
    if created_s is None:
        raise ValueError(f"job {job_id} has no created_at")
    return JobTimes(str(job_id), str(status), created_s, epoch_seconds(started), epoch_seconds(finished))


def finished_count(counts: Mapping[str, int]) -> int:
    return sum(n for status, n in counts.items() if status in TERMINAL)


# --- a minimal HTTP/1.1 client ---------------------------------------------------------------------------


class HttpError(Exception):
    """A request that got no complete answer (the kind is the exception's name in the figures)."""


class StaleConnection(HttpError):
    """A kept-alive connection that the server had closed: the request never reached it."""


def http_request(url: str, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """The bytes of one request, built once and sent as they are, again and again."""
    host = urlsplit(url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url}: the benchmark's client speaks plain http:// only")
    return parts.hostname, parts.port or 80


class HttpConnection:
    """One keep-alive connection that sends prepared requests and reads each answer: the status line, the
    headers and a `Content-Length` body. It costs far less CPU per request than a full client (httpx
    spends about 0.3 ms), which matters when the load generator shares the cores with the system."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.served = 0
        self.closed = False
        self.in_flight = False  # a request sent and its answer not read yet: not reusable

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=HTTP_READ_LIMIT)
        return cls(reader, writer)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request`; (status, body) of the answer. Raises HttpError (the connection is then closed)."""
        self.in_flight = True
        try:
            self.writer.write(request)
            status_line = await self.reader.readline()
            if not status_line:
                raise (StaleConnection if self.served else HttpError)("connection closed by the server")
            status = int(status_line.split(None, 2)[1])
            length, keep_alive = await self.read_headers()
            body = await self.reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        except HttpError:
            self.close()
            raise
        self.served += 1
        self.in_flight = False
        if not keep_alive:
            self.close()
        return status, body

    async def read_headers(self) -> tuple[int, bool]:
        """(Content-Length, whether the connection stays open) from the headers."""
        length: int | None = None
        keep_alive = True
        while True:
            line = await self.reader.readline()
            if not line:
                raise HttpError("connection closed in the headers")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                keep_alive = value.strip().lower() != b"close"
            elif name == b"transfer-encoding":
                raise HttpError(f"unsupported Transfer-Encoding: {value.strip().decode(errors='replace')}")
        if length is None:
            raise HttpError("an answer without Content-Length")
        return length, keep_alive

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class ConnectionPool:
    """Keep-alive connections to one server, taken in turn (the oldest free one first, so that none idles
    long enough for the server to close it); opens another when all are busy, up to `cap`, and then
    makes requests wait for a free one."""

    def __init__(self, host: str, port: int, cap: int) -> None:
        self.host = host
        self.port = port
        self.cap = cap
        self.idle: deque[HttpConnection] = deque()
        self.size = 0
        self.peak = 0
        self.waited = 0  # requests that found the pool full
        self.changed = asyncio.Condition()

    async def fill(self, count: int) -> None:
        """Open connections until there are `count` (at most `cap`); stop at the first that fails, and
        leave the error to the requests, which count it."""
        for _ in range(min(count, self.cap) - self.size):
            try:
                conn = await HttpConnection.open(self.host, self.port)
            except OSError:
                break
            self.size += 1
            self.idle.append(conn)
        self.peak = max(self.peak, self.size)

    async def acquire(self) -> HttpConnection:
        async with self.changed:
            waited = False
            while not self.idle and self.size >= self.cap:
                waited = True
                await self.changed.wait()
            self.waited += waited
            if self.idle:
                return self.idle.popleft()
            self.size += 1
            self.peak = max(self.peak, self.size)
        try:
            return await HttpConnection.open(self.host, self.port)
        except BaseException:  # refused, or cancelled by a request's timeout: the slot is free again
            await self.discard(None)
            raise

    async def release(self, conn: HttpConnection) -> None:
        if conn.closed or conn.in_flight:  # an error, or a request cancelled half-way
            await self.discard(conn)
            return
        async with self.changed:
            self.idle.append(conn)
            self.changed.notify()

    async def discard(self, conn: HttpConnection | None) -> None:
        if conn is not None:
            conn.close()
        async with self.changed:
            self.size -= 1
            self.changed.notify()

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send `request` on a free connection, once more on a new one if the server had closed it idle."""
        for attempt in range(2):
            conn = await self.acquire()
            try:
                return await conn.exchange(request)
            except StaleConnection:
                if attempt:
                    raise
            finally:
                await self.release(conn)
        raise AssertionError("unreachable")

    def close(self) -> None:
        while self.idle:
            self.idle.popleft().close()


# --- a PostgreSQL of the benchmark's own ---------------------------------------------------------------


class EmbeddedPostgres:
    """`PostgresServer` (`tests/postgres_server.py`) in a fresh temporary folder, on a free port."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="conveyor-bench-pg-"))
        self.root.chmod(POSTGRES_ROOT_MODE)
        self.server = PostgresServer(self.root, port=free_port())

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (the first line of postmaster.pid), while it runs."""
        try:
            return int((self.server.pgdata / POSTMASTER_PID_FILE).read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        self.server.start(timeout=POSTGRES_START_TIMEOUT_S)

    def stop(self) -> None:
        self.server.stop()

    def remove(self) -> None:
        cluster_home = self.server.pgdata.parent
        shutil.rmtree(self.root, ignore_errors=True)
        if cluster_home != self.root:  # a shadow folder under /tmp (see PostgresServer)
            shutil.rmtree(cluster_home, ignore_errors=True)


def run_with_postgres(keep_data: bool, run: Callable[[EmbeddedPostgres], int]) -> int:
    """Start a PostgreSQL, `run(it)`, then stop it and (unless `keep_data`) remove its folder; `run`'s
    exit status, or EXIT_STARTUP_FAILED if PostgreSQL did not start."""
    postgres = EmbeddedPostgres()
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    console.print(f"Starting PostgreSQL (port {postgres.server.port}, data in {postgres.root})...")
    failed = True
    try:
        started = time.perf_counter()
        try:
            postgres.start()
        except PostgresError as exc:
            console.print(f"[red]PostgreSQL did not start: {exc}[/red]", markup=False)
            return EXIT_STARTUP_FAILED
        console.print(f"PostgreSQL ready in {time.perf_counter() - started:.1f} s.")
        code = run(postgres)
        failed = code != EXIT_OK
        return code
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/yellow]")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            postgres.stop()
        except PostgresError as exc:
            console.print(f"Could not stop PostgreSQL: {exc}", markup=False, style="red")
            failed = True
        finally:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if failed or keep_data:
            console.print(f"PostgreSQL data and log kept in {postgres.root}")
        else:
            postgres.remove()


# --- options ----------------------------------------------------------------------------------------------


class Workers:
    """`python -m conveyor worker` processes on a started stack's broker and database, for benchmarks
    that start their workers themselves; `env` adds settings (`CONVEYOR_...`) of their own."""

    def __init__(self, stack: EmbeddedStack, count: int, concurrency: int, **env: str) -> None:
        self.stack = stack
        self.count = count
        self.concurrency = concurrency
        self.extra_env = env
        self.log_path = stack.root / "workers.log"
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = self.stack.env(
            CONVEYOR_KAFKA_BOOTSTRAP=f"{LOCALHOST}:{self.stack.kafka_port}",
            CONVEYOR_WORKER_CONCURRENCY=str(self.concurrency),
            CONVEYOR_WORKER_METRICS_PORT="0",  # several on one host: one fixed port would not do
            **self.extra_env,
        )
        with self.log_path.open("ab") as log:
            self.processes += [spawn_conveyor("worker", env, log) for _ in range(self.count)]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            wait_or_kill(process, f"worker {process.pid} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")


def new_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)


def add_option(parser: argparse.ArgumentParser, flag: str, default: int | float, about: str) -> None:
    """A numeric option whose type is its default's, and whose help ends with that default."""
    parser.add_argument(flag, type=type(default), default=default, help=f"{about} (default %(default)s)")


def add_url_option(parser: argparse.ArgumentParser) -> None:
    """--url: an external gateway instead of a started stack."""
    parser.add_argument("--url", help="a running gateway; without it the benchmark starts its own stack")


def add_key_option(parser: argparse.ArgumentParser) -> None:
    """--key: the API key for --url (checked by check_target)."""
    parser.add_argument("--key", help=f"API key for --url (default: env {BENCH_KEY_ENV})")


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="database for the started stack (default: SQLite)")


def add_stack_options(parser: argparse.ArgumentParser, wait_timeout_s: float, wait_about: str) -> None:
    """The started stack's startup deadline, the run's deadline, and what to keep (each script's last)."""
    add_option(parser, "--startup-timeout", DEFAULT_STARTUP_TIMEOUT_S, "seconds")
    add_option(parser, "--wait-timeout", wait_timeout_s, wait_about)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep the started stack's temporary folder")


def check_at_least_one(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> None:
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def check_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.url and not (args.key or os.environ.get(BENCH_KEY_ENV)):
        parser.error(f"--url needs --key or {BENCH_KEY_ENV}")


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class StackFigures:
    """The figures every benchmark writes first; each script's own figures follow (``--json`` order)."""

    settings: dict[str, Any]
    startup_s: float | None = None
    load_avg_end: float | None = None


F = TypeVar("F", bound=StackFigures)


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


def start_stack(stack: EmbeddedStack, figures: StackFigures, timeout_s: float) -> bool:
    """Start `stack` and wait until it is ready; on failure print why, with the end of its log."""
    console.print(
        f"Starting the stack (`conveyor run`; Kafka on ports {stack.kafka_port}-"
        f"{stack.kafka_port + 1}, data and log in {stack.root})..."
    )
    stack.start()
    try:
        figures.startup_s = round(stack.wait_ready(timeout_s), 2)
    except StackError as exc:
        console.print(f"[red]Startup failed: {exc}[/red]")
        console.print(f"Stack log: {stack.log_path}; its last lines:")
        console.print(tail(stack.log_path), markup=False)
        return False
    console.print(f"Stack ready in {figures.startup_s:.1f} s (GET /readyz answered 200).")
    return True


def finish(figures: StackFigures, json_path: Path | None) -> None:
    """The load average after the run, and the figures as JSON when asked for."""
    figures.load_avg_end = os.getloadavg()[0]
    console.print(f"Load average (1 min) at the end: {figures.load_avg_end:.2f}")
    if json_path:
        json_path.write_text(json.dumps(figures.__dict__, indent=2) + "\n")
        console.print(f"Figures written to {json_path}")


def stack_without_workers(args: argparse.Namespace) -> EmbeddedStack:
    """A stack whose supervisor starts no workers: the benchmark starts its own (`Workers`) once its load
    is in place, so that nothing runs before it measures."""
    return EmbeddedStack(0, args.database_url, None)


def run_main(
    args: argparse.Namespace,
    new_stack: Callable[[argparse.Namespace], EmbeddedStack],
    new_figures: Callable[[argparse.Namespace, str, EmbeddedStack | None], F],
    print_header: Callable[[dict[str, Any]], None],
    benchmark: Callable[[argparse.Namespace, F, str, str, EmbeddedStack | None], Coroutine[Any, Any, None]],
) -> int:
    """Run a benchmark against `--url`, or against a stack it starts, stops and (unless kept) removes.

    `new_stack(args)` makes the stack (not started yet; not called for --url); `new_figures(args, url,
    stack)` makes the figures (the settings), and `print_header(settings)` prints them, before the stack
    starts; `benchmark(args, figures, url, key, stack)` measures. Ctrl-C and SIGTERM stop the stack
    cleanly, and the data folder is kept when anything failed, for its log.
    """
    stack: EmbeddedStack | None = None
    failed = True
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            stack = new_stack(args)
            url = stack.url
        figures = new_figures(args, url, stack)
        print_header(figures.settings)
        if stack is None:
            key = args.key or os.environ[BENCH_KEY_ENV]
        else:
            if not start_stack(stack, figures, args.startup_timeout):
                return EXIT_STARTUP_FAILED
            key = stack.api_key()
        asyncio.run(cancel_on_sigterm(benchmark(args, figures, url, key, stack)))
        finish(figures, args.json)
        failed = False
        return EXIT_OK
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]Interrupted.[/yellow]")
        return EXIT_INTERRUPTED
    finally:
        if stack is not None:
            stack.stop()
            if failed or args.keep_data:
                console.print(f"Stack data and log kept in {stack.root}")
            else:
                stack.remove()
        signal.signal(signal.SIGTERM, previous_sigterm)
