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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

import httpx
from rich import box
from rich.console import Console
from rich.table import Table

from conveyor.embedded.kafka import is_port_free

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
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
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
            name = component(pid)
            totals[name] = totals.get(name, 0.0) + stats[pid][1]
    return dict(totals)


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

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a process of this stack: its data folder and database, plus `settings`."""
        env = {key: value for key, value in os.environ.items() if key not in self.OVERRIDDEN}
        env.update(CONVEYOR_DATA_DIR=str(self.data_dir), CONVEYOR_HOST=LOCALHOST, PYTHONUNBUFFERED="1")
        env.update(settings)
        if self.database_url:
            env["CONVEYOR_DATABASE_URL"] = self.database_url
        return env

    def start(self) -> None:
        env = self.env(
            CONVEYOR_KAFKA_PORT=str(self.kafka_port),
            CONVEYOR_GATEWAY_PORT=str(self.gateway_port),
            CONVEYOR_PROGRESS_PORT=str(self.progress_port),
            CONVEYOR_WORKERS=str(self.workers),
            # The benchmarks measure capacity: the per-tenant limits would measure themselves instead.
            CONVEYOR_TENANT_SUBMIT_RATE=str(UNLIMITED),
            CONVEYOR_TENANT_SUBMIT_BURST=str(UNLIMITED),
            CONVEYOR_TENANT_MAX_QUEUED=str(UNLIMITED),
        )
        if self.worker_concurrency is not None:
            env["CONVEYOR_WORKER_CONCURRENCY"] = str(self.worker_concurrency)
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


def run_main(
    args: argparse.Namespace,
    new_stack: Callable[[argparse.Namespace], EmbeddedStack],
    begin: Callable[[argparse.Namespace, str, EmbeddedStack | None], F],
    benchmark: Callable[[argparse.Namespace, F, str, str, EmbeddedStack | None], Coroutine[Any, Any, None]],
) -> int:
    """Run a benchmark against `--url`, or against a stack it starts, stops and (unless kept) removes.

    `new_stack(args)` makes the stack (not started yet; None for --url); `begin(args, url, stack)` makes the
    figures (the settings) and prints the header, before the stack starts; `benchmark(args, figures, url,
    key, stack)` measures. Ctrl-C and SIGTERM stop the stack cleanly, and the
    data folder is kept when anything failed, for its log.
    """
    stack: EmbeddedStack | None = None
    failed = True
    previous_sigterm = signal.signal(signal.SIGTERM, interrupt)
    try:
        if args.url:
            url = args.url.rstrip("/")
            key = args.key or os.environ[BENCH_KEY_ENV]
            figures = begin(args, url, None)
        else:
            stack = new_stack(args)
            url = stack.url
            figures = begin(args, url, stack)
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
