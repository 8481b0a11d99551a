"""Run the progress service under uvicorn: one process, or several on one port (`processes`)."""

from __future__ import annotations

import sys

from conveyor.orphans import exit_with_parent
from conveyor.serving import serve_http
from conveyor.settings import Settings
from conveyor.tracing import configure_tracing
from services.progress.processes import supervise


def serve(settings: Settings, parent_pid: int | None = None) -> None:
    """The service, in this process or in `progress_process_count` children; `parent_pid`: this is
    one of those children, sharing the port with the others."""
    if parent_pid is not None:
        exit_with_parent(parent_pid)
        serve_one(settings, reuse_port=True)
        return
    count = settings.progress_process_count
    if count > 1:
        sys.exit(supervise(settings, count))
    serve_one(settings)


def serve_one(settings: Settings, reuse_port: bool = False) -> None:
    # Imported here: the parent of several processes serves nothing and needs none of it.
    from services.progress.app import create_app
    from services.progress.frames import ProgressWebSocketProtocol

    configure_tracing("conveyor-progress")
    app = create_app(settings)
    serve_http(app, settings, settings.progress_port, ws=ProgressWebSocketProtocol, reuse_port=reuse_port)
