"""The progress service as several processes on its one port (`CONVEYOR_PROGRESS_PROCESSES` > 1).

Delivering events is CPU work in one thread, so one process uses one core. `conveyor progress`
then starts that many children, each `conveyor progress` again (spawned, not forked: a fresh
interpreter), each a whole progress instance, as several replicas are: its own reader of the whole
events topic (no consumer group: each sees every event), its own database pool, its own per-tenant
caps. Each binds its own socket to the port with SO_REUSEPORT (`conveyor.serving`), and the kernel
spreads new connections over the children that listen.

The parent serves nothing. It supervises the children as `conveyor run` supervises its services
(`conveyor.supervisor`): a child that dies is started again with backoff while the others keep
serving; SIGTERM or Ctrl-C stops them all (each as a single process stops: its sockets are closed
with 1012, for clients to resume elsewhere) and then the parent exits. A child dies with its parent
(`conveyor.orphans`), even if the parent is SIGKILLed.

Metrics: the children write their series in prometheus-client's multiprocess mode to a folder the
parent makes and deletes (`conveyor.metrics`), so `/metrics` on the port, whichever child answers,
is the service's; the parent clears a dead child's live gauges (its open sockets) when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE

from conveyor.metrics import MULTIPROCESS_DIR_ENV
from conveyor.ports import port_is_free
from conveyor.settings import Settings
from conveyor.stopping import STOP_SIGNALS
from conveyor.supervisor import ServiceSpec, Supervisor

log = structlog.get_logger(__name__)

# How long a child may take to stop (its sockets closed, its hub and pool stopped) before it is
# killed: within the 20 s `conveyor run` gives the whole progress service.
CHILD_STOP_TIMEOUT_S = 15.0
PARENT_OPTION = "--parent-pid"
# The children's metrics files: their owner's alone.
METRICS_DIR_MODE = 0o700


def child_argv(parent_pid: int) -> list[str]:
    """`conveyor progress` as a child of `parent_pid`: one process on the shared port."""
    return [sys.executable, "-m", "conveyor", "progress", PARENT_OPTION, str(parent_pid)]


def child_name(number: int) -> str:
    return f"progress-{number}"


def supervise(settings: Settings, count: int) -> int:
    """Run `count` progress processes on the port until SIGTERM or SIGINT; the exit code."""
    if not port_is_free(settings.host, settings.progress_port):
        # Refused as a single process would be: with SO_REUSEPORT the children could join the port of
        # another service of ours (a stale one) and silently split its clients with it.
        log.error("progress.port_taken", host=settings.host, port=settings.progress_port)
        return STARTUP_FAILURE
    metrics_dir = fresh_metrics_dir(settings.host, settings.progress_port)
    env = {MULTIPROCESS_DIR_ENV: str(metrics_dir)}
    specs = [
        ServiceSpec(child_name(n), child_argv(os.getpid()), env, stop_timeout_s=CHILD_STOP_TIMEOUT_S)
        for n in range(1, count + 1)
    ]
    log.info("progress.processes", count=count, port=settings.progress_port, metrics_dir=str(metrics_dir))
    try:
        asyncio.run(_supervise(Supervisor(specs, on_exit=_forget_live_gauges(metrics_dir))))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("progress.stopped", count=count)
    return 0


def metrics_dir_path(host: str, port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"conveyor-progress-metrics-{os.getuid()}-{host}-{port}"


def fresh_metrics_dir(host: str, port: int) -> Path:
    """An empty folder for the children's series, named by the address: the one a SIGKILLed parent
    left (no `finally` ran) is emptied by the next start on that address, which is free, so no other
    service uses it. Anywhere else if it cannot be (another user made it)."""
    path = metrics_dir_path(host, port)
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(mode=METRICS_DIR_MODE)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="conveyor-progress-metrics-"))
    return path


def _forget_live_gauges(metrics_dir: Path) -> Callable[[str, int], None]:
    def forget(name: str, pid: int) -> None:
        # A dead child's sockets are closed: its open-socket gauge must not be summed any more.
        mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    return forget


async def _supervise(supervisor: Supervisor) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await supervisor.run(stop)
    finally:
        for signum in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
