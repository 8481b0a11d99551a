"""`GET /v1/stats`'s query: one statement whose halves each read an index, never the tenant's whole
history (its counts are tested against a real stack in tests/test_client.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

from conveyor.database import Database
from conveyor.jobstats import queue_stats
from conveyor.models import utcnow


def query_plan(db_kind: str) -> Any:
    def plan(connection: Connection) -> str:
        statements: list[Any] = []

        class Recording:
            """Records the statement queue_stats sends, and answers it with no rows."""

            def execute(self, statement: Any) -> list[Any]:
                statements.append(statement)
                return []

        queue_stats(Recording(), "tenant-a", utcnow())  # type: ignore[arg-type]
        [statement] = statements
        sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
        if db_kind == "postgresql":
            # On an empty table a sequential scan is cheapest; what matters is that an index can answer.
            connection.execute(text("SET LOCAL enable_seqscan = off"))
            return "\n".join(row[0] for row in connection.execute(text(f"EXPLAIN {sql}")))
        return "\n".join(row[3] for row in connection.execute(text(f"EXPLAIN QUERY PLAN {sql}")))

    return plan


async def test_the_stats_query_reads_two_indexes_and_no_history(db: Database, database_kind: str) -> None:
    plan = await db.read(query_plan(database_kind))
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
