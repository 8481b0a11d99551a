"""A running job's progress reports, written to the database one at a time.

A handler may report progress far faster than the database takes writes (each report is a change
written by the committer, with the rest of its batch). Reports are handed to a
writer and the handler goes on at once; while one report is being written, newer ones replace each
other, so under load the newest wins and no backlog builds up. A job's events stay gap-free: only
reports that were never written are skipped, and each written one gets the next `seq`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

WriteProgress = Callable[[float | None, str | None], Awaitable[None]]


class ProgressWriter:
    def __init__(self, job_id: str, write: WriteProgress) -> None:
        self._job_id = job_id
        self._write = write
        self._pending: tuple[float | None, str | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def report(self, percent: float | None, message: str | None) -> None:
        self._pending = (percent, message)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=f"progress-{self._job_id}")

    async def flush(self) -> None:
        """Wait until every report made so far is written (or given up on)."""
        if self._task is not None:
            await self._task

    async def _drain(self) -> None:
        while self._pending is not None:
            (percent, message), self._pending = self._pending, None
            try:
                await self._write(percent, message)
            except Exception as exc:
                # A lost progress report is not a lost job: the next report, or the outcome, follows.
                log.warning("progress.write_failed", job_id=self._job_id, error=str(exc))
