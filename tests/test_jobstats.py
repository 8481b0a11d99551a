"""`GET /v1/stats`'s query: one statement whose halves each read an index, never the tenant's whole
history (its counts are tested against a real stack in tests/test_client.py)."""

from __future__ import annotations

from conveyor.database import Database
from conveyor.jobstats import queue_stats
from conveyor.models import utcnow

from harness import query_plan


async def test_the_stats_query_reads_two_indexes_and_no_history(db: Database) -> None:
    plan = await query_plan(db, lambda connection: queue_stats(connection, "tenant-a", utcnow()))
    assert "ix_jobs_tenant_status" in plan, plan
    assert "ix_jobs_finished_at" in plan, plan
    assert "SCAN jobs" not in plan and "Seq Scan" not in plan, plan


async def test_an_empty_tenant_has_every_priority_at_zero(db: Database) -> None:
    stats = await db.read(lambda connection: queue_stats(connection, "nobody", utcnow()))
    document = stats.document()
    assert document["priorities"] == {
        str(level): {"scheduled": 0, "queued": 0, "running": 0} for level in range(1, 6)
    }
    assert document["finished_last_minute"] == {"canceled": 0, "failed": 0, "succeeded": 0}
    assert document["oldest_queued_at"] is None
