"""Background loops: a chore that runs every N seconds, backs off while it fails, and stops cleanly.

Every service has a few (the outbox relay's sweep, lease renewal, the reaper, the scheduler, pruning).
Each is a `BackgroundTask`: started once, stopped once, its failures logged and spaced out rather than
retried in a tight loop, and one failed round never ends the chore for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Past this exponent the doubling is far beyond any sensible cap; stop before floats overflow.
MAX_EXPONENT = 62


def exponential_delay(failures: int, base_s: float, cap_s: float) -> float:
    """How long to wait after `failures` failures in a row: base, doubling each time, up to the cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap_s, base_s * 2.0 ** min(failures - 1, MAX_EXPONENT)))


class BackgroundTask:
    """One coroutine run as a task of its own, from `start` until `stop` (or until it returns)."""

    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._body = body
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._body(), name=self.name)

    async def stop(self, grace_s: float = 0.0) -> bool:
        """Wait up to `grace_s` for the task to end by itself (for a body told to finish by other means),
        then cancel it and wait for it to end. True if it ended within the grace. A task that failed or
        was never started is fine."""
        task = self._task
        if task is None:
            return True
        if grace_s > 0:
            await asyncio.wait({task}, timeout=grace_s)
        self._task = None
        ended = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ended


async def run_every(
    interval_s: float,
    action: Callable[[], Awaitable[object]],
    *,
    failure_event: str,
    failure_cap_s: float | None = None,
) -> None:
    """Sleep `interval_s`, run `action`, forever. A failed round is logged as `failure_event`. With a
    `failure_cap_s`, the wait doubles while rounds keep failing, up to that cap; without one the next
    round comes at the usual interval (what a lease renewal needs: it must not wait longer)."""
    failures = 0
    while True:
        cap_s = interval_s if failure_cap_s is None else max(interval_s, failure_cap_s)
        await asyncio.sleep(max(interval_s, exponential_delay(failures, interval_s, cap_s)))
        try:
            await action()
        except Exception:
            failures += 1
            log.exception(failure_event, failures=failures)
        else:
            failures = 0


async def retry_every(interval_s: float, attempt: Callable[[], Awaitable[bool]]) -> None:
    """Sleep `interval_s` and call `attempt`, until it returns True. For a chore that is done once it
    succeeds (creating the topics, say); `attempt` reports its own failures."""
    while True:
        await asyncio.sleep(interval_s)
        if await attempt():
            return


def every(
    interval_s: float,
    action: Callable[[], Awaitable[object]],
    *,
    name: str,
    failure_event: str,
    failure_cap_s: float | None = None,
) -> BackgroundTask:
    """A chore that runs `action` every `interval_s` (see `run_every`), not started yet."""
    return BackgroundTask(
        name,
        lambda: run_every(interval_s, action, failure_event=failure_event, failure_cap_s=failure_cap_s),
    )
