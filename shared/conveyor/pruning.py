"""Deleting rows once nobody needs them: finished jobs' event histories, expired idempotency keys.

Several instances may prune at once: the deletes are idempotent, so they need no coordination.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.database import Database

log = structlog.get_logger(__name__)

PRUNE_INTERVAL_S = 600.0

# Deletes what is no longer needed in the given transaction; returns how many rows.
PruneStep = Callable[[AsyncSession], Awaitable[int]]


class Pruner:
    def __init__(
        self, db: Database, name: str, step: PruneStep, interval_s: float = PRUNE_INTERVAL_S
    ) -> None:
        self._db = db
        self._name = name
        self._step = step
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pruner-{self._name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def prune_once(self) -> int:
        async with self._db.session() as session:
            return await self._step(session)

    async def _run(self) -> None:
        while True:
            try:
                deleted = await self.prune_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("prune.failed", what=self._name, error=str(exc))
            else:
                if deleted:
                    log.info("prune.done", what=self._name, rows=deleted)
            await asyncio.sleep(self._interval_s)
