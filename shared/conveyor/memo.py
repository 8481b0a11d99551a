"""A value worked out at most once per period, however many callers ask for it meanwhile.

For answers that cost a round trip (the stored API keys, readiness) and that many requests ask for:
while the value is fresh every caller gets it from memory; once stale, one caller works it out again
while the others are answered with the previous value (or, before there is one, wait for it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Remembered(Generic[T]):
    def __init__(self, work_out: Callable[[], Awaitable[T]], period_s: float) -> None:
        self._work_out = work_out
        self._period_s = period_s
        # The latest value, in a tuple so that a value of None is told from none yet.
        self._latest: tuple[T] | None = None
        self._at = 0.0
        self._working = asyncio.Lock()

    async def get(self) -> T:
        latest = self._latest
        if latest is not None and (self._fresh() or self._working.locked()):
            return latest[0]
        async with self._working:
            latest = self._latest
            if latest is None or not self._fresh():  # else another caller did it while this one waited
                started = time.monotonic()
                latest = self._latest = (await self._work_out(),)
                self._at = started
        return latest[0]

    def _fresh(self) -> bool:
        return time.monotonic() - self._at < self._period_s
