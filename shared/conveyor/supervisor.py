"""A small process supervisor for the embedded stack: each service is its own OS process, restarted
with backoff when it dies, as compose's `restart: unless-stopped` would do in production.

Services can be added while it runs (`add`) and retired (`retire`: SIGTERM, then wait for the process
to exit, up to its spec's `stop_timeout_s`, and never restart it): the autoscaler's two moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Callable
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
    # How long SIGTERM may take before the process is killed; a worker's is its worst-case drain.
    stop_timeout_s: float = STOP_GRACE_S


@dataclass
class _Running:
    spec: ServiceSpec
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    watcher: BackgroundTask | None = None
    # Set when the supervisor stops or the service is retired: its process is not started again.
    done: asyncio.Event = field(default_factory=asyncio.Event)


# Told of each process that exited (its service's name, its pid), before it is started again.
ExitHook = Callable[[str, int], None]


class Supervisor:
    def __init__(self, specs: list[ServiceSpec], on_exit: ExitHook | None = None) -> None:
        self._services = {spec.name: _Running(spec) for spec in specs}
        self._on_exit = on_exit
        self._stopping = asyncio.Event()
        self._running = False

    async def run(self, stop: asyncio.Event) -> None:
        """Run every service until `stop` is set, then stop them all."""
        self._running = True
        for service in list(self._services.values()):
            self._watch(service)
        await stop.wait()
        self._stopping.set()
        services = list(self._services.values())
        for service in services:
            service.done.set()
        await asyncio.gather(*(self._terminate(service) for service in services))
        await asyncio.gather(*(service.watcher.stop() for service in services if service.watcher))

    def add(self, spec: ServiceSpec) -> None:
        """Start one more service (while `run` runs); it is supervised as the others are."""
        if spec.name in self._services:
            raise ValueError(f"a service named {spec.name!r} runs already")
        service = self._services[spec.name] = _Running(spec)
        if self._stopping.is_set():
            service.done.set()
        elif self._running:
            self._watch(service)

    async def retire(self, name: str) -> int | None:
        """Stop one service for good: SIGTERM, wait up to its `stop_timeout_s` for it to exit (then kill
        it), and forget it. Its exit code (None if it was not running)."""
        service = self._services[name]
        service.done.set()
        log.info("supervisor.retiring", service=name, timeout_s=service.spec.stop_timeout_s)
        await self._terminate(service)
        if service.watcher is not None:
            # It ends by itself now (a process it was spawning meanwhile, it stops too).
            await service.watcher.stop(grace_s=service.spec.stop_timeout_s)
        self._services.pop(name, None)
        code = service.process.returncode if service.process is not None else None
        log.info("supervisor.retired", service=name, code=code)
        return code

    def names(self) -> list[str]:
        """The services supervised now, retiring ones included."""
        return list(self._services)

    def pids(self) -> dict[str, int]:
        return {
            name: s.process.pid
            for name, s in self._services.items()
            if s.process and s.process.returncode is None
        }

    def _watch(self, service: _Running) -> None:
        service.watcher = BackgroundTask(
            f"supervise-{service.spec.name}", functools.partial(self._keep_running, service)
        )
        service.watcher.start()

    async def _keep_running(self, service: _Running) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not service.done.is_set():
            started = loop.time()
            service.process = await asyncio.create_subprocess_exec(
                *service.spec.argv,
                env={**os.environ, **service.spec.env},
                # Own session: Ctrl-C reaches the supervisor only, which then stops services in order.
                start_new_session=True,
            )
            if service.done.is_set():  # stop or retire began while this process was being spawned
                await self._terminate(service)
                return
            log.info("supervisor.started", service=service.spec.name, pid=service.process.pid)
            code = await service.process.wait()
            if self._on_exit is not None:
                self._on_exit(service.spec.name, service.process.pid)
            if service.done.is_set():
                return
            failures = 0 if loop.time() - started >= HEALTHY_AFTER_S else failures + 1
            delay = exponential_delay(failures, RESTART_BASE_S, RESTART_CAP_S)
            service.restarts += 1
            log.warning("supervisor.exited", service=service.spec.name, code=code, restart_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(service.done.wait(), timeout=delay)

    async def _terminate(self, service: _Running) -> None:
        process = service.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # it exited just now
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=service.spec.stop_timeout_s)
        except TimeoutError:
            log.warning("supervisor.kill", service=service.spec.name)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
