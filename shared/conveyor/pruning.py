"""Deleting rows once nobody needs them: finished jobs' event histories, expired idempotency keys.

Several instances may prune at once: the deletes are idempotent, so they need no coordination.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.background import BackgroundTask, run_every
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
        self._loop = BackgroundTask(f"pruner-{name}", self._run)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def prune_once(self) -> int:
        async with self._db.session() as session:
            return await self._step(session)

    async def _run(self) -> None:
        # A first round at once: a service that restarts often would otherwise never prune.
        await self._round()
        await run_every(self._interval_s, self._round, failure_event="prune.failed")

    async def _round(self) -> None:
        try:
            deleted = await self.prune_once()
        except (SQLAlchemyError, OSError) as exc:
            # The database is away: a warning, not a traceback; the next round tries again.
            log.warning("prune.failed", what=self._name, error=str(exc))
        else:
            if deleted:
                log.info("prune.done", what=self._name, rows=deleted)
