"""The worker's background chores (lease renewal, the reaper, the cancel watch, the scheduler) each run
an action at a fixed interval, and must outlive a failed round."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


async def run_every(interval_s: float, action: Callable[[], Awaitable[object]], failure_event: str) -> None:
    """Sleep `interval_s`, run `action`, forever. A failed round (the database away, say) is logged as
    `failure_event` and the next round tries again: one hiccup must not stop a chore for good."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception:
            log.exception(failure_event)
