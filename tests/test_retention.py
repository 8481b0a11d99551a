"""Retention on a running stack: a backlog of 50,000 finished jobs past `CONVEYOR_JOB_RETENTION_S` is
deleted a bounded batch at a time while clients keep submitting, and no submission gets a 503."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import Connection, func, insert, select

from conveyor.clock import database_now
from conveyor.database import Database
from conveyor.lifecycle import JobState
from conveyor.models import JOBS, JobEventRecord, JobLabel

from harness import TENANT_A, Stack, eventually

OLD_JOBS = 50_000
INSERT_CHUNK = 5_000
SUBMITTERS = 4
PRUNED_WITHIN_S = 240

# The submissions run as fast as the stack takes them: more than a tenant's default rate.
pytestmark = pytest.mark.stack_settings(
    CONVEYOR_TENANT_SUBMIT_RATE=100000, CONVEYOR_TENANT_SUBMIT_BURST=100000
)


def old_finished_jobs(connection: Connection, count: int) -> None:
    """`count` jobs that succeeded 30 days ago, each with one event and one label, as the write path
    leaves them (written here directly: 50,000 through the API would take minutes)."""
    finished_at = database_now(connection) - timedelta(days=30)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    row = {
        "tenant": TENANT_A,
        "type": "demo.noop",
        "status": JobState.SUCCEEDED,
        "priority": 3,
        "payload": {},
        "attempts": 1,
        "max_attempts": 1,
        "labels": {"batch": "old"},
        "last_seq": 1,
        "created_at": finished_at,
        "updated_at": finished_at,
        "started_at": finished_at,
        "finished_at": finished_at,
    }
    connection.execute(insert(JOBS), [{**row, "id": job_id} for job_id in ids])
    connection.execute(
        insert(JobEventRecord.__table__), [{"job_id": job_id, "seq": 1, "body": "{}"} for job_id in ids]
    )
    connection.execute(
        insert(JobLabel.__table__), [{"job_id": job_id, "key": "batch", "value": "old"} for job_id in ids]
    )


async def old_jobs_left(db: Database) -> int:
    def read(connection: Connection) -> int:
        old = JOBS.c.finished_at < database_now(connection) - timedelta(days=29)
        return int(connection.execute(select(func.count()).where(old)).scalar_one())

    return await db.read(read)


async def test_pruning_50000_old_jobs_while_submitting_gives_no_503(stack: Stack, database_url: str) -> None:
    db = Database(database_url)
    statuses: Counter[int] = Counter()
    pruned = asyncio.Event()
    try:
        for _ in range(OLD_JOBS // INSERT_CHUNK):
            await db.write(lambda connection: old_finished_jobs(connection, INSERT_CHUNK))
        assert await old_jobs_left(db) == OLD_JOBS

        async with stack.client() as client:

            async def submit_until_pruned() -> None:
                while not pruned.is_set():
                    response = await client.post("/v1/jobs", json={"type": "demo.noop"})
                    statuses[response.status_code] += 1

            submitters = [asyncio.create_task(submit_until_pruned()) for _ in range(SUBMITTERS)]
            try:
                # A second gateway prunes at its start, while the first one takes the submissions.
                stack.start_gateway("gateway-2")

                async def all_pruned() -> bool:
                    return await old_jobs_left(db) == 0

                await eventually(all_pruned, PRUNED_WITHIN_S, "the old jobs to be pruned")
            finally:
                pruned.set()
                await asyncio.gather(*submitters)
    finally:
        await db.close()
    assert set(statuses) == {202}, statuses
    assert statuses[202] > 0
