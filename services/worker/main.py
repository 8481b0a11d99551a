"""Run a worker until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

import asyncio
import signal

from conveyor.handlers import load_handler_modules
from conveyor.settings import Settings
from conveyor.tracing import configure_tracing
from services.worker.runner import Worker


def serve(settings: Settings) -> None:
    configure_tracing("conveyor-worker")
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker = Worker(settings, load_handler_modules(settings.handler_modules))
    await worker.run(stop)
