"""Run the progress service under uvicorn."""

from __future__ import annotations

import uvicorn

from conveyor.settings import Settings
from services.progress.app import create_app


def serve(settings: Settings) -> None:
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.progress_port,
        log_config=None,
        access_log=False,
    )
