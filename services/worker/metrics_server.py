"""The worker's own small HTTP server: `GET /metrics` (this process's series, for the metrics token) and
`GET /healthz`, on `CONVEYOR_WORKER_METRICS_PORT` (`conveyor run` gives each worker its own).

It runs in the worker's event loop, so `/healthz` answering means the loop turns: a liveness probe on
it notices a worker whose loop is stuck, not only one whose process is gone. It answers nothing else
and reads no database.

A port that cannot be bound (taken by another process) is logged and the worker runs on without it:
running jobs matters more than being watched, and a liveness probe will say so where there is one.
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


def metrics_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="Conveyor worker", openapi_url=None, docs_url=None, redoc_url=None)
    install_problem_handlers(app)
    app.add_middleware(HttpMetrics)
    app.include_router(metrics_router(settings.metrics_token))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The worker's event loop turns."""
        return {"status": "ok"}

    return app


class _InLoopServer(uvicorn.Server):
    """uvicorn in a loop that is not its own: the worker's signal handlers (SIGTERM drains) stay
    the worker's, which uvicorn would otherwise replace with its own while it serves."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsServer:
    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self._settings = settings
        self.port = settings.worker_metrics_port if port is None else port
        self._server: _InLoopServer | None = None
        self._task: BackgroundTask | None = None

    async def start(self) -> None:
        if not self.port:
            return
        try:
            listener = _bound(self._settings.host, self.port)
        except OSError as exc:
            log.error("worker.metrics_port_unavailable", port=self.port, error=str(exc))
            return
        config = uvicorn.Config(
            metrics_app(self._settings), log_config=None, access_log=False, lifespan="off", loop="none"
        )
        server = self._server = _InLoopServer(config)
        self._task = BackgroundTask("metrics-server", lambda: server.serve(sockets=[listener]))
        self._task.start()
        log.info("worker.metrics_serving", port=self.port)

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
