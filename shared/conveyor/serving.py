"""Serving an HTTP service (the gateway, the progress service) under uvicorn.

One process binds the port as uvicorn does. Several processes may share it instead (`reuse_port`):
each binds a socket of its own with SO_REUSEPORT, and the kernel spreads new connections over the
ones that listen. A process listens only once its app has started (uvicorn listens after the
lifespan), so none is handed connections before it can serve them. Linux lets only processes of the
same user join a port this way.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import STARTUP_FAILURE

from conveyor.settings import Settings

log = structlog.get_logger(__name__)


def serve_http(
    app: ASGIApp, settings: Settings, port: int, ws: Any = "auto", reuse_port: bool = False
) -> None:
    """`ws`: uvicorn's WebSocket protocol, by name or as a class; `reuse_port`: share the port with
    other processes (SO_REUSEPORT)."""
    options = uvicorn_options(settings, port, ws)
    if not reuse_port:
        uvicorn.run(app, **options)
        return
    try:
        sock = shared_port_socket(settings.host, port)
    except OSError as exc:
        log.error("serving.bind_failed", host=settings.host, port=port, error=str(exc))
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    log.info("serving.port_shared", host=settings.host, port=port, pid=os.getpid())
    server.run(sockets=[sock])
    # As `uvicorn.run`: a server that did not start (its lifespan failed) exits with uvicorn's code.
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def uvicorn_options(settings: Settings, port: int, ws: Any = "auto") -> dict[str, Any]:
    """How our services run under uvicorn (`uvicorn.Config`'s keywords, the app aside)."""
    # Our structlog setup, not uvicorn's logging config; no access log on the hot path. WebSocket
    # heartbeats are protocol pings at this interval (the progress service sends them from one timer,
    # `services.progress.keepalive`): a peer that stops answering them is dropped.
    return dict(
        host=settings.host,
        port=port,
        log_config=None,
        access_log=False,
        ws=ws,
        ws_ping_interval=settings.progress_ping_interval_s,
        ws_ping_timeout=settings.progress_ping_timeout_s,
        ws_per_message_deflate=settings.progress_ws_deflate,
        # uvicorn's default is 16 MiB, read before the app has even seen a key.
        ws_max_size=settings.progress_ws_max_bytes,
    )


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not listening yet (uvicorn listens on it)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
