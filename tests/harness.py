"""Runs Conveyor's services as real OS processes for tests, as they run in production, and holds what
the tests share: submitting jobs, reading what the services answered, logged and wrote."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import websockets
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import Connection, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from conveyor import sqlstats
from conveyor.changes import Change, Unit, Written, write_changes
from conveyor.database import Database
from conveyor.eventlog import events_between
from conveyor.events import JobEvent
from conveyor.models import JOBS, OutboxMessage
from conveyor.topics import worker_group

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1

TENANT_A, KEY_A = "tenant-a", "key-a-0123456789abcdefghij"
TENANT_B, KEY_B = "tenant-b", "key-b-0123456789abcdefghij"
METRICS_TOKEN = "metrics-0123456789abcdefghij"
# Every series the issue names, as the exposition writes them (a counter's samples end in `_total`).
METRIC_SERIES = (
    "conveyor_jobs_submitted_total",
    "conveyor_jobs_rejected_total",
    "conveyor_jobs_finished_total",
    "conveyor_job_queue_wait_seconds",
    "conveyor_job_run_seconds",
    "conveyor_job_end_to_end_seconds",
    "conveyor_worker_slots",
    "conveyor_consumer_lag_messages",
    "conveyor_outbox_rows",
    "conveyor_outbox_oldest_age_seconds",
    "conveyor_websocket_connections",
    "conveyor_event_delivery_seconds",
    "conveyor_http_requests_total",
    "conveyor_http_request_seconds",
)
PROBLEM_JSON = "application/problem+json"
# How a worker logs a partition: `topic[partition]`.
PARTITION_NAME = re.compile(r"^(?P<topic>.+)\[(?P<partition>\d+)\]$")


async def write_now(db: Database, prefix: str, *changes: Change, atomic: bool = False) -> Written:
    """Write `changes` in one transaction, as a service's committer would, and hand back what it staged
    in the outbox (unpublished, unless the caller publishes it)."""
    units = [Unit(changes, atomic=atomic)]
    return await db.write(functools.partial(write_changes, units=units, prefix=prefix))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(check: Any, within_s: float, what: str) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; fail after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


@dataclass
class Stack:
    """A gateway, workers and a progress service sharing one database and one topic prefix."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each worker's metrics port (`/metrics`, `/healthz`), by its name.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.env['CONVEYOR_GATEWAY_PORT']}"

    @property
    def progress_url(self) -> str:
        return f"ws://127.0.0.1:{self.env['CONVEYOR_PROGRESS_PORT']}"

    def start(self, name: str, command: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        if (command or name) == "worker":
            # A port of its own (the default, 8002, would be shared by every test's workers); the same
            # one again when the same worker is started again.
            port = self.metrics_ports.get(name) or int(env.get("CONVEYOR_WORKER_METRICS_PORT") or free_port())
            self.metrics_ports[name] = port
            env = {"CONVEYOR_WORKER_METRICS_PORT": str(port), **env}
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "conveyor", command or name],
            env={**os.environ, **self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_gateway(self, name: str, **env: str) -> str:
        """Another gateway on a port of its own, not waited for (it may never be ready); its URL."""
        port = free_port()
        self.start(name, "gateway", CONVEYOR_GATEWAY_PORT=str(port), **env)
        return f"http://127.0.0.1:{port}"

    async def start_progress(self, name: str, port: int | None = None, **env: str) -> str:
        """Another progress instance on its own port (the same one again after a restart); its ws:// URL."""
        port = port or free_port()
        self.start(name, "progress", CONVEYOR_PROGRESS_PORT=str(port), **env)
        await self.wait_ready(f"http://127.0.0.1:{port}")
        return f"ws://127.0.0.1:{port}"

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        process.send_signal(signum)
        process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, name: str) -> None:
        """Stop one service for good (SIGTERM) and forget it."""
        process = self.processes.pop(name)
        process.terminate()
        _reap(process)

    def stop_all(self) -> None:
        # Every service is told first, so they stop side by side rather than one after another.
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            _reap(process)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    async def wait_ready(self, base_url: str) -> None:
        async with httpx.AsyncClient(timeout=5) as client:

            async def ready() -> bool:
                for process in self.processes.values():
                    if process.poll() is not None:
                        raise AssertionError(f"a service exited early: {process.args}\n{self._logs()}")
                try:
                    return (await client.get(f"{base_url}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, READY_TIMEOUT_S, f"{base_url}/readyz")

    def _logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.log_dir.glob("*.log")
        )

    def worker_metrics_url(self, name: str = "worker-1") -> str:
        return f"http://127.0.0.1:{self.metrics_ports[name]}"

    def client(self, key: str = KEY_A, base_url: str | None = None) -> httpx.AsyncClient:
        """A client of the gateway (or of another one at `base_url`) as `key`'s tenant."""
        return httpx.AsyncClient(
            base_url=base_url or self.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    async def submit_job(self, body: dict[str, Any], key: str = KEY_A) -> str:
        """Submit a job as `key`'s tenant, on a client of its own; the job's id."""
        async with self.client(key) as client:
            job_id: str = (await submit(client, body))["id"]
            return job_id


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for a process that was told to stop; kill it if it takes longer than STOP_TIMEOUT_S."""
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_alive(base_url: str, within_s: float = READY_TIMEOUT_S) -> None:
    """Wait until a service answers /healthz: alive, though perhaps not ready (a dependency is down)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:

        async def alive() -> bool:
            try:
                return (await client.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(alive, within_s, f"{base_url}/healthz")


# --- Processes ---


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command line (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            try:
                found[child] = (
                    (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
            except OSError:
                continue
            frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- Jobs over HTTP ---


async def submit_response(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    """POST a job; the gateway's response, which must be a 202."""
    response = await client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response


async def submit(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """POST a job, which must be accepted; the job, as the 202 describes it."""
    job: dict[str, Any] = (await submit_response(client, body, **headers)).json()
    return job


def sleep_job(seconds: float, steps: int | None = None) -> dict[str, Any]:
    """A `demo.sleep` job: `steps` progress reports (by default about one a second) over `seconds`."""
    return {
        "type": "demo.sleep",
        "payload": {"seconds": seconds, "steps": max(1, round(seconds)) if steps is None else steps},
    }


async def wait_for_status(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], within_s: float
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        return body if body["status"] in statuses else None

    result: dict[str, Any] = await eventually(reached, within_s, f"job {job_id} to reach {statuses}")
    return result


async def nothing_waiting(client: httpx.AsyncClient) -> bool:
    """Whether the client's tenant has no job queued or scheduled."""
    page = (await client.get("/v1/jobs", params={"status": ["scheduled", "queued"]})).json()
    return page["items"] == []


async def collect_events(
    stack: Stack, job_id: str, key: str = KEY_A
) -> tuple[list[dict[str, Any]], int | None]:
    """Every message of the job's WebSocket until the server closes it (once the job is done); and the
    close code."""
    url = f"{stack.progress_url}/v1/jobs/{job_id}/events"
    messages = []
    headers = {"Authorization": f"Bearer {key}"}
    # No frame limit: an event may carry a result of up to CONVEYOR_MAX_RESULT_BYTES, which may be more
    # than the 1 MiB websockets takes by default.
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        async for raw in ws:
            messages.append(json.loads(raw))
        return messages, ws.close_code


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    """The response is a problem document (RFC 9457) of `status`; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["title"]
    return body


# --- The command line ---


async def cli(stack: Stack, *args: str, env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """Run `conveyor ARGS`: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conveyor",
        *args,
        env={**os.environ, **stack.env, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    return process.returncode, stdout.decode().strip(), stderr.decode().strip()


async def run_cli(stack: Stack, *args: str) -> str:
    """Run `conveyor ARGS`, which must succeed; its output."""
    returncode, stdout, stderr = await cli(stack, *args)
    assert returncode == 0, stderr
    return stdout


# --- What the services logged and wrote ---


def worker_events(stack: Stack, event: str, job_id: str | None = None, worker: str = "worker-1") -> list[Any]:
    """The worker's log records of `event` (for `job_id`), oldest first. Needs CONVEYOR_LOG_JSON."""
    records = []
    for line in stack.log(worker).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # not structlog's: a traceback, a library's own line
        if record.get("event") == event and (job_id is None or record.get("job_id") == job_id):
            records.append(record)
    return records


def assignments(stack: Stack, worker: str) -> list[tuple[datetime, set[TopicPartition]]]:
    """Each `worker.assigned` of the worker: when, and the partitions of its job topics."""
    result = []
    for record in worker_events(stack, "worker.assigned", worker=worker):
        partitions = set()
        for name in record["partitions"]:
            match = PARTITION_NAME.match(name)
            assert match is not None, name
            partitions.add(TopicPartition(match["topic"], int(match["partition"])))
        result.append((datetime.fromisoformat(record["timestamp"]), partitions))
    return result


def at(timestamp: str) -> datetime:
    """A log record's (or a job's) timestamp, in UTC."""
    return datetime.fromisoformat(timestamp).astimezone(UTC)


async def group_members(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """The consumer group's state and its members' ids, as the broker's coordinator sees them (the
    state is `error <code>` while the coordinator cannot tell)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    (described,) = response.groups
    error_code, _, state, _, _, members, *_ = described
    if error_code != 0:  # the coordinator is still loading, say: no state to tell yet
        return f"error {error_code}", []
    return state, sorted(member[0] for member in members)


async def workers_in_the_group(stack: Stack, count: int) -> None:
    """Wait until the workers' consumer group is stable with `count` members: each holds partitions."""
    group = worker_group(stack.env["CONVEYOR_TOPIC_PREFIX"])

    async def stable() -> bool:
        state, members = await group_members(stack.env["CONVEYOR_KAFKA_BOOTSTRAP"], group)
        return state == "Stable" and len(members) == count

    await eventually(stable, 60, f"{count} workers to hold partitions")


async def event_history(db: Database, job_id: str) -> list[JobEvent]:
    """The job's whole event history, oldest first (the job exists, and its history has no gaps)."""

    def read(connection: Connection) -> list[JobEvent]:
        row = connection.execute(select(JOBS.c.tenant, JOBS.c.last_seq).where(JOBS.c.id == job_id)).first()
        assert row is not None, f"no job {job_id}"
        events = events_between(connection, job_id, 0, row.last_seq, tenant=row.tenant)
        assert events is not None, f"the history of {job_id} has gaps"
        return events

    return await db.read(read)


def stats_file(stats_dir: Path) -> Path:
    """The counts file of the one gateway started with CONVEYOR_SQL_STATS_DIR=`stats_dir`."""
    (path,) = stats_dir.glob("gateway-*.json")
    return path


def selects(stats_dir: Path, table: str | None = None) -> int:
    """The SELECTs that gateway has sent so far (conveyor.sqlstats writes them twice a second); with
    `table`, only those that read from it first."""
    path = stats_file(stats_dir)
    counts: dict[str, int] = json.loads(path.read_text())["counts"]
    return counts.get(f"selects.from.{table}" if table else "statements.select", 0)


async def selects_since(stats_dir: Path, moment: float, table: str | None = None) -> int:
    """The gateway's SELECTs (from `table`, if named) once its counts file was written a full
    interval after `moment` (a `time.time()`), so that it counts every statement sent before then."""
    path = stats_file(stats_dir)
    later = moment + sqlstats.WRITE_INTERVAL_S
    await eventually(lambda: path.stat().st_mtime > later, 10, "the SQL counts to be written again")
    return selects(stats_dir, table)


# How long a window of counted statements lasts.
SQL_WINDOW_S = 2.0


async def select_rate(stats_dir: Path) -> float:
    """That gateway's SELECTs a second over SQL_WINDOW_S (a measurement, not a wait for an event)."""
    started, before = time.monotonic(), selects(stats_dir)
    await asyncio.sleep(SQL_WINDOW_S)
    return (selects(stats_dir) - before) / (time.monotonic() - started)


async def counted_gateway(stack: Stack, name: str, directory: Path, **env: str) -> tuple[str, Path]:
    """Another gateway that counts its SQL into a folder under `directory`, ready and counting; its
    URL, and the folder (for `selects` and `select_rate`)."""
    stats_dir = directory / f"sqlstats-{name}"
    url = stack.start_gateway(name, CONVEYOR_SQL_STATS_DIR=str(stats_dir), **env)
    await stack.wait_ready(url)
    await eventually(lambda: list(stats_dir.glob("gateway-*.json")), 10, f"{name}'s SQL counts")
    return url, stats_dir


async def outbox_size(db: Database) -> int:
    """How many messages wait in the outbox, not yet published."""
    async with db.reading() as session:
        return int(await session.scalar(select(func.count()).select_from(OutboxMessage)) or 0)


# --- The database refusing ---


@asynccontextmanager
async def database_refusing_writes(
    kind: str, database_url: str, admin_url: str | None
) -> AsyncIterator[None]:
    """PostgreSQL: the database refuses every connection. SQLite: the test holds the write lock, so a
    writer gives up after its busy timeout."""
    if kind == "sqlite":
        path = make_url(database_url).database
        assert path
        lock = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")
            yield
        finally:
            lock.rollback()
            lock.close()
        return
    assert admin_url is not None
    name = make_url(database_url).database
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        try:
            yield
        finally:
            async with admin.connect() as connection:
                await connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    finally:
        await admin.dispose()


def start_conveyor(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m conveyor ARGS` in a session of its own (so a test can kill its whole group)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ConveyorRun:
    """A test's `conveyor run` (the embedded stack, as `make run` starts it), its settings in `env`."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.env['CONVEYOR_GATEWAY_PORT']}"

    def start(self) -> subprocess.Popen[bytes]:
        self.process = start_conveyor(["run"], {**os.environ, **self.env}, self.log_path)
        return self.process

    def check_running(self) -> subprocess.Popen[bytes]:
        """The process, if it still runs; else fail with the end of its log."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"conveyor run exited:\n{self.log_path.read_text()[-4000:]}")
        return self.process

    async def ready(self) -> bool:
        """Whether the gateway and the progress service both answer /readyz with 200."""
        self.check_running()
        try:
            async with httpx.AsyncClient() as client:
                gateway = await client.get(f"{self.gateway}/readyz")
                progress = await client.get(f"http://127.0.0.1:{self.env['CONVEYOR_PROGRESS_PORT']}/readyz")
        except httpx.TransportError:
            return False
        return gateway.status_code == 200 and progress.status_code == 200


class _StatementSent(Exception):
    def __init__(self, statement: Any) -> None:
        self.statement = statement


class _StatementCatcher:
    """Stands in for a connection: takes the first statement a query function sends, and stops it."""

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        raise _StatementSent(statement)


async def query_plan(db: Database, send: Callable[[Connection], object]) -> str:
    """The database's plan for the first statement `send(connection)` would execute. On PostgreSQL with
    sequential scans off: on a test's nearly empty table one is cheapest, and what matters is that an
    index can answer."""

    def plan(connection: Connection) -> str:
        try:
            send(_StatementCatcher())  # type: ignore[arg-type]
        except _StatementSent as sent:
            statement = sent.statement
        else:
            raise AssertionError("the function sent no statement")
        sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
        if connection.dialect.name == "postgresql":
            connection.execute(text("SET LOCAL enable_seqscan = off"))
            return "\n".join(row[0] for row in connection.execute(text(f"EXPLAIN {sql}")))
        return "\n".join(row[3] for row in connection.execute(text(f"EXPLAIN QUERY PLAN {sql}")))

    return await db.read(plan)
