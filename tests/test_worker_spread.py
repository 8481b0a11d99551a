"""One tenant keeps every worker busy: its jobs spread over every partition (keyed by job id), so four
worker processes each run about a quarter of them. And batched claims and outcomes lose nothing when a
worker is killed with SIGKILL in the middle of them. Real Kafka, real processes."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, select

from conveyor.database import Database
from conveyor.lifecycle import JobState
from conveyor.models import JOBS
from conveyor.topics import job_topic

from harness import Stack, assignments, event_history, eventually, worker_events

WORKERS = 4
PARTITIONS = 12  # as many as an even share for 4 workers needs (the default)
JOBS_PER_BATCH = 1000
SPREAD_JOBS = 2000
JOIN_TIMEOUT_S = 60
FINISH_TIMEOUT_S = 120


pytestmark = pytest.mark.stack_settings(
    CONVEYOR_PARTITIONS=PARTITIONS,
    CONVEYOR_LOG_JSON="true",
    # Thousands of jobs in a few seconds: more than a tenant's default rate.
    CONVEYOR_TENANT_SUBMIT_RATE=100000,
    CONVEYOR_TENANT_SUBMIT_BURST=100000,
)


async def submit_batches(client: httpx.AsyncClient, count: int, job: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    for first in range(0, count, JOBS_PER_BATCH):
        size = min(JOBS_PER_BATCH, count - first)
        response = await client.post("/v1/jobs/batch", json={"jobs": [job] * size})
        assert response.status_code == 202, response.text
        ids += [item["id"] for item in response.json()["items"]]
    return ids


async def finished_by_worker(db: Database, ids: list[str]) -> Counter[str] | None:
    """How many of the jobs each worker ran, once all of them have succeeded; None until then."""

    def read(connection: Connection) -> list[tuple[str, str | None]]:
        rows: list[tuple[str, str | None]] = []
        for first in range(0, len(ids), 500):
            query = select(JOBS.c.status, JOBS.c.worker_id).where(JOBS.c.id.in_(ids[first : first + 500]))
            rows += [(row.status, row.worker_id) for row in connection.execute(query)]
        return rows

    rows = await db.read(read)
    if len(rows) < len(ids) or any(status != JobState.SUCCEEDED for status, _ in rows):
        return None
    return Counter(worker or "" for _, worker in rows)


def settled(stack: Stack, names: list[str], prefix: str) -> bool:
    """Whether the workers' latest assignments split the p3 topic's partitions evenly and completely."""
    latest = [assignments(stack, name) for name in names]
    if not all(latest):
        return False
    p3 = [{tp.partition for tp in parts[-1][1] if tp.topic == job_topic(prefix, 3)} for parts in latest]
    even = [PARTITIONS // len(names)] * len(names)
    return sorted(len(share) for share in p3) == even and len(set().union(*p3)) == PARTITIONS


async def test_four_workers_share_one_tenants_jobs_evenly(stack: Stack, database_url: str) -> None:
    names = ["worker-1", *(f"worker-{n}" for n in range(2, WORKERS + 1))]
    for name in names[1:]:
        stack.start(name, "worker")
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    await eventually(
        lambda: settled(stack, names, prefix), JOIN_TIMEOUT_S, "the four workers to share the partitions"
    )
    db = Database(database_url)
    try:
        async with stack.client() as client:  # one tenant
            ids = await submit_batches(client, SPREAD_JOBS, {"type": "demo.noop"})
        counts = await eventually(
            lambda: finished_by_worker(db, ids), FINISH_TIMEOUT_S, "every job to succeed"
        )
    finally:
        await db.close()
    worker_ids = {worker_events(stack, "worker.started", worker=name)[0]["worker_id"] for name in names}
    assert set(counts) == worker_ids, counts
    shares = {worker: count / SPREAD_JOBS for worker, count in counts.items()}
    assert all(0.20 <= share <= 0.30 for share in shares.values()), shares


# --- batched claims and outcomes, and SIGKILL ------------------------------------------------------------

KILL_JOBS = 600
KILL_JOB_S = 0.05
KILL_AFTER = 150  # jobs finished before the kill: the batches are well under way
WORKER_CONCURRENCY = 8  # the default


async def succeeded_count(db: Database, ids: list[str]) -> int:
    def read(connection: Connection) -> int:
        done = 0
        for first in range(0, len(ids), 500):
            query = select(JOBS.c.id).where(
                JOBS.c.id.in_(ids[first : first + 500]), JOBS.c.status == JobState.SUCCEEDED
            )
            done += len(connection.execute(query).all())
        return done

    return await db.read(read)


async def test_a_worker_killed_amid_batched_claims_and_outcomes_loses_and_repeats_nothing(
    stack: Stack, database_url: str
) -> None:
    stack.start("worker-2", "worker")
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    await eventually(
        lambda: settled(stack, ["worker-1", "worker-2"], prefix), JOIN_TIMEOUT_S, "two workers to share"
    )
    db = Database(database_url)
    try:
        async with stack.client() as client:
            job = {"type": "demo.sleep", "payload": {"seconds": KILL_JOB_S, "steps": 1}}
            ids = await submit_batches(client, KILL_JOBS, job)
            await eventually(
                lambda: _at_least(succeeded_count(db, ids), KILL_AFTER), 60, "the run to be under way"
            )
            stack.kill("worker-1", signal.SIGKILL)
            await eventually(
                lambda: _at_least(succeeded_count(db, ids), KILL_JOBS), FINISH_TIMEOUT_S, "every job"
            )
        histories = await asyncio.gather(*(event_history(db, job_id) for job_id in ids))
    finally:
        await db.close()

    once = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    # A job the killed worker held: its lease ran out, the reaper queued it again, worker-2 ran attempt 2.
    twice = [JobState.QUEUED, JobState.RUNNING, JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    repeated = []
    for job_id, events in zip(ids, histories, strict=True):
        assert [event.seq for event in events] == list(range(1, len(events) + 1)), job_id
        states = [(JobState(event.status), event.attempt) for event in events if event.type == "state"]
        if [state for state, _ in states] == twice:
            assert [attempt for _, attempt in states] == [0, 1, 1, 2, 2], states
            repeated.append(job_id)
        else:
            assert states == list(zip(once, [0, 1, 1], strict=True)), (job_id, states)
    # Only jobs the killed worker had claimed and not yet recorded ran again: its slots, and the outcomes
    # of the slots it had freed but not yet committed (a batch or two).
    assert repeated, "the kill landed while the worker held jobs: some of them ran again"
    assert len(repeated) <= 3 * WORKER_CONCURRENCY, f"{len(repeated)} jobs ran twice"


async def _at_least(count: Any, wanted: int) -> bool:
    return int(await count) >= wanted
