"""Faults on a running stack: a crash storm of workers under load. Every accepted job ends `succeeded`,
and no two attempts of one job ever run at the same time."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, select
from tracked_handlers import attempts_run

from conveyor.database import Database
from conveyor.lifecycle import JobState
from conveyor.models import JOBS

from harness import Stack, eventually

STORM_JOBS = 2000
STORM_JOB_SECONDS = 0.2
STORM_WORKERS = 2
STORM_KILLS = 10
STORM_KILL_EVERY_S = 5.0
STORM_FINISH_S = 300
SUBMIT_BATCH = 500
TESTS_DIR = str(Path(__file__).parent)

pytestmark = pytest.mark.stack_settings(
    # The workers import `tracked_handlers` from this folder.
    PYTHONPATH=os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])),
    CONVEYOR_HANDLERS="conveyor.demo,tracked_handlers",
    CONVEYOR_WORKER_CONCURRENCY=8,
    # The whole load at once: more than a tenant's default rate.
    CONVEYOR_TENANT_SUBMIT_RATE=100_000,
    CONVEYOR_TENANT_SUBMIT_BURST=100_000,
)


async def statuses(db: Database) -> dict[JobState, int]:
    def read(connection: Connection) -> dict[JobState, int]:
        query = select(JOBS.c.status, func.count()).group_by(JOBS.c.status)
        return {JobState(status): int(count) for status, count in connection.execute(query)}

    return await db.read(read)


async def test_a_crash_storm_loses_no_job_and_never_runs_one_twice_at_once(
    stack: Stack, database_url: str, tmp_path: Path
) -> None:
    track = tmp_path / "attempts.log"
    workers = [f"worker-{n}" for n in range(1, STORM_WORKERS + 1)]
    for name in workers[1:]:
        stack.start(name, "worker")
    killed_at: dict[int, float] = {}  # pid -> when it was killed

    async with stack.client() as client:
        body = {"type": "test.tracked", "payload": {"seconds": STORM_JOB_SECONDS, "log": str(track)}}
        ids: list[str] = []
        for _ in range(STORM_JOBS // SUBMIT_BATCH):
            response = await client.post("/v1/jobs/batch", json={"jobs": [body] * SUBMIT_BATCH})
            assert response.status_code == 202, response.text
            ids += [job["id"] for job in response.json()["items"]]

        rng = random.Random(7)
        for _ in range(STORM_KILLS):
            await asyncio.sleep(STORM_KILL_EVERY_S)
            victim = rng.choice(workers)
            pid = stack.processes[victim].pid
            stack.kill(victim)
            killed_at[pid] = time.time()
            # As the supervisor would: a new worker in its place.
            stack.start(victim, "worker")

    db = Database(database_url)
    try:

        async def all_finished() -> bool:
            return (await statuses(db)).get(JobState.SUCCEEDED, 0) == STORM_JOBS

        await eventually(all_finished, STORM_FINISH_S, "every job to succeed")
        assert await statuses(db) == {JobState.SUCCEEDED: STORM_JOBS}
    finally:
        await db.close()
    runs = attempts_run(track)
    assert set(runs) == set(ids)
    overlaps = []
    for attempts in runs.values():
        for earlier, later in itertools.pairwise(attempts):
            # An attempt killed with its worker ended, at the latest, when the worker was killed.
            ended_at = earlier.ended_at or killed_at.get(earlier.pid)
            assert ended_at is not None, f"attempt {earlier} never ended, and its worker was not killed"
            if later.started_at < ended_at:
                overlaps.append((earlier, later))
    assert overlaps == []
    assert any(len(attempts) > 1 for attempts in runs.values()), "no kill landed mid-job"
