"""A worker killed with SIGKILL mid-job: the job completes on another worker, with the next attempt."""

from __future__ import annotations

import httpx

from conveyor.database import Database
from conveyor.jobstore import load_job

from harness import Stack, eventually, wait_for_status


async def running_worker_pid(db: Database, job_id: str) -> int | None:
    async with db.session() as session:
        job = await session.run_sync(load_job, job_id)
    if job is None or job.status != "running" or job.worker_id is None:
        return None
    return int(job.worker_id.split("-")[-2])  # worker ids are host-pid-random


async def has_progress(client: httpx.AsyncClient, job_id: str) -> bool:
    return bool((await client.get(f"/v1/jobs/{job_id}")).json()["progress"]["percent"])


async def test_a_job_survives_its_worker_being_killed(stack: Stack, database_url: str) -> None:
    stack.start("worker-2", "worker")
    db = Database(database_url)
    try:
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

            final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, 60)
        async with db.session() as session:
            record = await session.run_sync(load_job, job["id"])
    finally:
        await db.close()

    assert final["status"] == "succeeded"
    assert final["attempts"] == 2
    assert record is not None and record.worker_id is not None
    assert f"-{stack.processes[survivor].pid}-" in record.worker_id
    assert "lease.expired" in stack.log(survivor)
