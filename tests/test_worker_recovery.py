"""A worker killed with SIGKILL mid-job: the job completes on another worker, with the next attempt."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from conveyor.database import Database
from conveyor.jobstore import load_job
from conveyor.lifecycle import JobState

from harness import (
    Stack,
    assignments,
    event_history,
    eventually,
    sleep_job,
    submit,
    wait_for_status,
    workers_in_the_group,
)


async def running_worker_pid(db: Database, job_id: str) -> int | None:
    async with db.session() as session:
        job = await session.run_sync(load_job, job_id)
    if job is None or job.status != "running" or job.worker_id is None:
        return None
    return int(job.worker_id.split("-")[-2])  # worker ids are host-pid-random


async def has_progress(client: httpx.AsyncClient, job_id: str) -> bool:
    return bool((await client.get(f"/v1/jobs/{job_id}")).json()["progress"]["percent"])


# The production lease (the tests' default is shorter), so that the heartbeat is seen to be what acts.
LEASE_S = 15


@pytest.mark.stack_settings(CONVEYOR_LEASE_S=LEASE_S, CONVEYOR_LOG_JSON="true")
async def test_a_job_survives_its_worker_being_killed(stack: Stack, database_url: str) -> None:
    """The next attempt starts once the dead worker's heartbeat is a few seconds old, on a partition of
    the worker that took it over: long before the lease its attempt held could have run out, and without
    waiting for Kafka to move the dead worker's partitions."""
    stack.start("worker-2", "worker")
    db = Database(database_url)
    try:
        await workers_in_the_group(stack, 2)
        async with stack.client() as client:
            job = (
                await client.post(
                    "/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": 4, "steps": 8}}
                )
            ).json()
            first_pid = await eventually(lambda: running_worker_pid(db, job["id"]), 60, "the job to start")
            victim = next(name for name, p in stack.processes.items() if p.pid == first_pid)
            survivor = "worker-2" if victim == "worker-1" else "worker-1"
            await eventually(
                lambda: has_progress(client, job["id"]), 30, "progress, so the kill lands mid-job"
            )
            stack.kill(victim)
            killed_at = datetime.now(UTC)
            async with db.session() as session:
                held = await session.run_sync(load_job, job["id"])
            assert held is not None and held.lease_expires_at is not None and held.attempts == 1

            final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, 60)
        history = await event_history(db, job["id"])
        async with db.session() as session:
            record = await session.run_sync(load_job, job["id"])
    finally:
        await db.close()

    assert final["status"] == "succeeded"
    assert final["attempts"] == 2
    assert record is not None and record.worker_id is not None
    assert f"-{stack.processes[survivor].pid}-" in record.worker_id
    assert "lease.expired" in stack.log(survivor)
    restarted_at = next(e.at for e in history if e.status == JobState.RUNNING and e.attempt == 2)
    # By the heartbeat, not the lease: the attempt held its lease well past this moment.
    assert restarted_at < held.lease_expires_at, (restarted_at - killed_at, held.lease_expires_at - killed_at)
    # And on a partition the survivor held already: Kafka had not moved the dead worker's to it yet.
    moved = [at for at, _ in assignments(stack, survivor) if killed_at < at < restarted_at]
    assert moved == [], moved
    print(f"kill -9 to the next attempt running: {(restarted_at - killed_at).total_seconds():.2f} s")


# A worker's clock this far ahead saw every other worker's leases (3 s long in the tests) as expired.
SKEW_S = 30
SKEW_JOBS = 8


async def test_a_worker_whose_clock_runs_ahead_reaps_no_live_attempt(stack: Stack, database_url: str) -> None:
    """Leases are set and compared by the database's clock: a reaper on a host 30 s ahead takes no job
    from a live worker, and the jobs it runs itself keep their leases too."""
    stack.start("worker-2", "worker", CONVEYOR_CLOCK_SKEW_S=str(SKEW_S))
    await workers_in_the_group(stack, 2)
    async with stack.client() as client:
        # Longer than two leases, so that each job is renewed while the skewed reaper looks.
        jobs = [await submit(client, sleep_job(7, steps=7)) for _ in range(SKEW_JOBS)]
        finished = [await wait_for_status(client, job["id"], {"succeeded", "failed"}, 90) for job in jobs]

    assert [(job["status"], job["attempts"]) for job in finished] == [("succeeded", 1)] * SKEW_JOBS
    db = Database(database_url)
    try:
        runners = set()
        for job in jobs:
            async with db.session() as session:
                record = await session.run_sync(load_job, job["id"])
            assert record is not None and record.worker_id is not None
            runners.add(record.worker_id)
    finally:
        await db.close()
    # Some of the jobs ran on the worker whose clock is right: the skewed reaper had leases to take.
    assert len(runners) == 2, runners
