"""A small process supervisor for the embedded stack: each service is its own OS process, restarted
with backoff when it dies, as compose's `restart: unless-stopped` would do in production."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from dataclasses import dataclass, field

import structlog

from conveyor.background import BackgroundTask, exponential_delay

log = structlog.get_logger(__name__)

RESTART_BASE_S = 1.0
RESTART_CAP_S = 30.0
# A process that stayed up this long is healthy again: its next crash restarts it without delay.
HEALTHY_AFTER_S = 30.0
STOP_GRACE_S = 20.0


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Running:
    spec: ServiceSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, specs: list[ServiceSpec]) -> None:
        self._services = [_Running(spec) for spec in specs]
        self._stopping = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Run every service until `stop` is set, then stop them all."""
        watchers = [
            BackgroundTask(f"supervise-{service.spec.name}", functools.partial(self._keep_running, service))
            for service in self._services
        ]
        for watcher in watchers:
            watcher.start()
        await stop.wait()
        self._stopping.set()
        await asyncio.gather(*(self._terminate(service) for service in self._services))
        await asyncio.gather(*(watcher.stop() for watcher in watchers))

    def pids(self) -> dict[str, int]:
        return {
            s.spec.name: s.process.pid for s in self._services if s.process and s.process.returncode is None
        }

    async def _keep_running(self, service: _Running) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            started = loop.time()
            service.process = await asyncio.create_subprocess_exec(
                *service.spec.argv,
                env={**os.environ, **service.spec.env},
                # Own session: Ctrl-C reaches the supervisor only, which then stops services in order.
                start_new_session=True,
            )
            if self._stopping.is_set():  # stop began while this process was being spawned
                await self._terminate(service)
                return
            log.info("supervisor.started", service=service.spec.name, pid=service.process.pid)
            code = await service.process.wait()
            if self._stopping.is_set():
                return
            failures = 0 if loop.time() - started >= HEALTHY_AFTER_S else failures + 1
            delay = exponential_delay(failures, RESTART_BASE_S, RESTART_CAP_S)
            service.restarts += 1
            log.warning("supervisor.exited", service=service.spec.name, code=code, restart_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _terminate(self, service: _Running) -> None:
        process = service.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=STOP_GRACE_S)
        except TimeoutError:
            log.warning("supervisor.kill", service=service.spec.name)
            process.kill()
            await process.wait()
