"""What waits, read every few seconds for the gauges: the workers' consumer lag and the outbox.

`conveyor_consumer_lag_messages{priority}` is read from Kafka by `conveyor.lag` (each job partition's
end offset minus the workers' group's committed offset, summed by priority level; the autoscaler of
`conveyor run` reads the same) and `conveyor_outbox_rows` /
`conveyor_outbox_oldest_age_seconds` from the database, by one task every `BACKLOG_INTERVAL_S`, never per
job or per scrape: a scrape only reads the gauges. The gateway runs it, not the workers: the lag
matters most when no worker is running at all (a backlog behind workers that scaled to zero, or all
died). Every gateway instance reads the same values, so aggregate them with `max`, not `sum`.

A reading that fails (Kafka or the database away) is logged and its gauges are cleared rather than
left at a stale value; the other reading still goes on.
"""

from __future__ import annotations

import asyncio

import structlog

from conveyor.background import BackgroundTask
from conveyor.database import Database
from conveyor.lag import GroupLag
from conveyor.metrics import CONSUMER_LAG, OUTBOX_OLDEST_AGE, OUTBOX_ROWS
from conveyor.outbox import backlog

log = structlog.get_logger(__name__)

# Often enough for an alert over minutes and for a dashboard; a reading is one aggregate query and
# four Kafka requests.
BACKLOG_INTERVAL_S = 5.0
# One reading may take this long at most (Kafka or the database slow); then it counts as failed.
READING_TIMEOUT_S = 10.0


class BacklogGauges:
    def __init__(
        self, db: Database, bootstrap: str, prefix: str, interval_s: float = BACKLOG_INTERVAL_S
    ) -> None:
        self._db = db
        self._interval_s = interval_s
        self._task = BackgroundTask("backlog-gauges", self._run)
        # Kept from one reading to the next (a connection each time would cost the broker more than the
        # reading); made again after a failure (which also learns partitions added since).
        self._lag = GroupLag(bootstrap, prefix)
        self._lag_started = False

    async def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            await self.read()
            await asyncio.sleep(self._interval_s)

    async def read(self) -> None:
        """One reading of both: the outbox, then the lag."""
        try:
            async with asyncio.timeout(READING_TIMEOUT_S):
                rows, oldest_age_s = await self._db.read(backlog)
        except Exception as exc:
            log.warning("backlog.outbox_unread", error=str(exc) or type(exc).__name__)
            OUTBOX_ROWS.set(float("nan"))
            OUTBOX_OLDEST_AGE.set(float("nan"))
        else:
            OUTBOX_ROWS.set(rows)
            OUTBOX_OLDEST_AGE.set(oldest_age_s)
        try:
            async with asyncio.timeout(READING_TIMEOUT_S):
                lag = await self._read_lag()
        except Exception as exc:
            log.warning("backlog.lag_unread", error=str(exc) or type(exc).__name__)
            CONSUMER_LAG.clear()
            await self._disconnect()
        else:
            for priority, messages in lag.items():
                CONSUMER_LAG.labels(str(priority)).set(messages)

    async def _read_lag(self) -> dict[int, int]:
        if not self._lag_started:
            await self._lag.start()
            self._lag_started = True
        return await self._lag.by_priority()

    async def _disconnect(self) -> None:
        self._lag_started = False
        try:
            await self._lag.stop()
        except Exception as exc:  # clients that never connected; nothing to keep of them
            log.debug("backlog.disconnect_failed", error=str(exc))
