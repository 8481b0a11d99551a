"""Runs Conveyor's services as real OS processes for tests, as they run in production."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from conveyor.changes import Change, Unit, Written, write_changes
from conveyor.database import Database

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1

TENANT_A, KEY_A = "tenant-a", "key-a-0123456789"
TENANT_B, KEY_B = "tenant-b", "key-b-0123456789"


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

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.env['CONVEYOR_GATEWAY_PORT']}"

    @property
    def progress_url(self) -> str:
        return f"ws://127.0.0.1:{self.env['CONVEYOR_PROGRESS_PORT']}"

    def start(self, name: str, command: str | None = None, **env: str) -> subprocess.Popen[bytes]:
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
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

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

    def client(self, key: str = KEY_A) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.gateway_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )


async def wait_for_status(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], within_s: float
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        return body if body["status"] in statuses else None

    result: dict[str, Any] = await eventually(reached, within_s, f"job {job_id} to reach {statuses}")
    return result


async def wait_alive(base_url: str, within_s: float = READY_TIMEOUT_S) -> None:
    """Wait until a service answers /healthz: alive, though perhaps not ready (a dependency is down)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:

        async def alive() -> bool:
            try:
                return (await client.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(alive, within_s, f"{base_url}/healthz")
