"""Run the progress service under uvicorn."""

from __future__ import annotations

from conveyor.serving import serve_http
from conveyor.settings import Settings
from conveyor.tracing import configure_tracing
from services.progress.app import create_app
from services.progress.frames import ProgressWebSocketProtocol


def serve(settings: Settings) -> None:
    configure_tracing("conveyor-progress")
    serve_http(create_app(settings), settings, settings.progress_port, ws=ProgressWebSocketProtocol)
