"""A small HTTP server for a process that serves no API of its own: `GET /metrics` (this process's
series, for the metrics token) and `GET /healthz`. Each worker serves one on
`CONVEYOR_WORKER_METRICS_PORT` (`conveyor run` gives each worker its own), and `conveyor run` itself
one on `CONVEYOR_RUN_METRICS_PORT` (the autoscaler's gauge).

It runs in the process's event loop, so `/healthz` answering means the loop turns: a liveness probe
on it notices a worker whose loop is stuck, not only one whose process is gone. It answers nothing
else and reads no database.

A port that cannot be bound (taken by another process) is logged (`<service>.metrics_port_unavailable`)
and the process runs on without it: running jobs matters more than being watched, and a liveness probe
will say so where there is one.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn
from fastapi import FastAPI

from conveyor.background import BackgroundTask
from conveyor.httpmetrics import HttpMetrics, metrics_router
from conveyor.problems import install_problem_handlers
from conveyor.settings import Settings

log = structlog.get_logger(__name__)

# How long stopping waits for the server to close its connections.
STOP_GRACE_S = 2.0


def metrics_app(settings: Settings, service: str) -> FastAPI:
    app = FastAPI(title=f"Conveyor {service}", openapi_url=None, docs_url=None, redoc_url=None)
    install_problem_handlers(app)
    app.add_middleware(HttpMetrics)
    app.include_router(metrics_router(settings.metrics_token))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process's event loop turns."""
        return {"status": "ok"}

    return app


class _InLoopServer(uvicorn.Server):
    """uvicorn in a loop that is not its own: the process's signal handlers (a worker's SIGTERM drains)
    stay its own, which uvicorn would otherwise replace with its own while it serves."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsServer:
    """`service` names the process in its log lines and its app's title; `port` 0 serves nothing."""

    def __init__(self, settings: Settings, port: int, service: str) -> None:
        self._settings = settings
        self.port = port
        self._service = service
        self._server: _InLoopServer | None = None
        self._task: BackgroundTask | None = None

    async def start(self) -> None:
        if not self.port:
            return
        try:
            listener = _bound(self._settings.host, self.port)
        except OSError as exc:
            log.error(f"{self._service}.metrics_port_unavailable", port=self.port, error=str(exc))
            return
        config = uvicorn.Config(
            metrics_app(self._settings, self._service),
            log_config=None,
            access_log=False,
            lifespan="off",
            loop="none",
        )
        server = self._server = _InLoopServer(config)
        self._task = BackgroundTask("metrics-server", lambda: server.serve(sockets=[listener]))
        self._task.start()
        log.info(f"{self._service}.metrics_serving", port=self.port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task.stop(grace_s=STOP_GRACE_S)


def _bound(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen()
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener
