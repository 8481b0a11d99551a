"""Serving an HTTP service (the gateway, the progress service) under uvicorn."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp

from conveyor.settings import Settings


def serve_http(app: ASGIApp, settings: Settings, port: int) -> None:
    # Our structlog setup, not uvicorn's logging config; no access log on the hot path.
    uvicorn.run(app, host=settings.host, port=port, log_config=None, access_log=False)
