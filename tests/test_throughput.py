"""The dashboard's finished-per-minute query (`conveyor.throughput`), on SQLite and PostgreSQL: each
minute counted once, only the tenant's jobs, read through the index of finished jobs."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from conveyor import changes
from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.models import JobRecord, utcnow
from conveyor.throughput import CHART_MINUTES, finished_per_minute

from harness import query_plan, write_now

PREFIX = "throughput-test"


async def canceled_job(db: Database, tenant: str) -> JobRecord:
    [[created]] = (
        await write_now(
            db, PREFIX, NewJob(tenant=tenant, type="demo.echo", payload={}, priority=3, max_attempts=1)
        )
    ).results
    assert created.job is not None
    [[canceled]] = (await write_now(db, PREFIX, changes.cancel(created.job.id))).results
    assert canceled.job is not None and canceled.job.finished_at is not None
    return canceled.job


async def test_each_minute_counts_the_tenants_jobs_that_finished_in_it(db: Database) -> None:
    finished = [await canceled_job(db, "tenant-a") for _ in range(3)]
    await canceled_job(db, "tenant-b")
    latest = max(job.finished_at for job in finished if job.finished_at is not None)

    def counts(now_after_s: float) -> Any:
        return functools.partial(
            finished_per_minute, tenant="tenant-a", now=latest + timedelta(seconds=now_after_s)
        )

    # Just after: all three in the last minute.
    assert await db.read(counts(1)) == [0] * (CHART_MINUTES - 1) + [3]
    # Five and a half minutes later: in the minute six minutes back, and nowhere else.
    minutes = await db.read(counts(330))
    assert len(minutes) == CHART_MINUTES and sum(minutes) == 3 and minutes[CHART_MINUTES - 6] == 3
    # Past the window: none.
    assert await db.read(counts(CHART_MINUTES * 60 + 60)) == [0] * CHART_MINUTES
    assert await db.read(functools.partial(finished_per_minute, tenant="nobody", now=utcnow())) == [0] * 15


async def test_the_query_reads_the_index_of_finished_jobs(db: Database) -> None:
    described = await query_plan(db, lambda connection: finished_per_minute(connection, "tenant-a", utcnow()))
    assert "ix_jobs_finished_at" in described, described
    assert "SCAN jobs" not in described and "Seq Scan" not in described, described
