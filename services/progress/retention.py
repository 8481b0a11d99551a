"""Pruning finished jobs' event histories once clients no longer need them to resume."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError

from conveyor.database import Database
from conveyor.eventlog import prune_event_history
from conveyor.models import utcnow

log = structlog.get_logger(__name__)

# Several instances may prune at once: the deletes are idempotent, so they need no coordination.
PRUNE_INTERVAL_S = 600.0


class HistoryPruner:
    def __init__(self, db: Database, keep_s: float, interval_s: float = PRUNE_INTERVAL_S) -> None:
        self._db = db
        self._keep = timedelta(seconds=keep_s)
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-pruner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def prune_once(self) -> int:
        async with self._db.session() as session:
            return await prune_event_history(session, utcnow() - self._keep)

    async def _run(self) -> None:
        while True:
            try:
                deleted = await self.prune_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("history.prune_failed", error=str(exc))
            else:
                if deleted:
                    log.info("history.pruned", events=deleted)
            await asyncio.sleep(self._interval_s)
