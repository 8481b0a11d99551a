"""Serving an HTTP service (the gateway, the progress service) under uvicorn."""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.types import ASGIApp

from conveyor.settings import Settings


def serve_http(app: ASGIApp, settings: Settings, port: int, ws: Any = "auto") -> None:
    """`ws`: uvicorn's WebSocket protocol, by name or as a class."""
    # Our structlog setup, not uvicorn's logging config; no access log on the hot path. WebSocket
    # heartbeats are protocol pings sent by uvicorn: a peer that stops answering them is dropped.
    uvicorn.run(
        app,
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
