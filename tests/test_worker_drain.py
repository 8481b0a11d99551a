"""SIGTERM drains a worker: in-flight jobs get the grace period to finish, the rest are handed back
(queued again at once, without using up an attempt), offsets are committed, and the worker leaves."""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess

import pytest

from conveyor.changes import HANDED_BACK, MAX_FREE_HAND_BACKS
from conveyor.database import Database
from conveyor.events import JobEvent
from conveyor.jobstore import load_job
from conveyor.settings import DEFAULT_MAX_ATTEMPTS

from harness import Stack, event_history, eventually, sleep_job, submit, wait_for_status, worker_events

DRAIN_GRACE_S = 5.0
JOB_TIMEOUT_S = 60
# After the grace: interrupting the stubborn handler (at once), the hand-back writes, publishing what
# they staged, leaving the group. Generous for a loaded 2-core machine.
STOP_SLACK_S = 10.0


pytestmark = pytest.mark.stack_settings(CONVEYOR_DRAIN_GRACE_S=DRAIN_GRACE_S, CONVEYOR_LOG_JSON="true")


async def state_events(db: Database, job_id: str) -> list[JobEvent]:
    return [event for event in await event_history(db, job_id) if event.type == "state"]


async def test_sigterm_finishes_what_it_can_and_hands_back_the_rest_at_once(
    stack: Stack, database_url: str
) -> None:
    loop = asyncio.get_running_loop()
    db = Database(database_url)
    try:
        async with stack.client() as client:
            # Finishes inside the grace period although it ignores ctx.cancelled.
            short = (await submit(client, {"type": "demo.stubborn", "payload": {"seconds": 3}}))["id"]
            # Ignores ctx.cancelled and outlasts the grace: interrupted, then handed back.
            stubborn = (await submit(client, {"type": "demo.stubborn", "payload": {"seconds": 10}}))["id"]
            # Stops as soon as ctx.cancelled is set: handed back at once, not at the end of the grace.
            cooperative = (await submit(client, sleep_job(20)))["id"]
            for job_id in (short, stubborn, cooperative):
                await wait_for_status(client, job_id, {"running"}, JOB_TIMEOUT_S)

            worker = stack.processes["worker-1"]
            signalled = loop.time()
            worker.send_signal(signal.SIGTERM)
            await eventually(
                lambda: worker.poll() is not None, DRAIN_GRACE_S + STOP_SLACK_S, "the worker to exit"
            )
            stopped_in_s = loop.time() - signalled
            # Nothing runs now: what the worker handed back must already be queued, not waiting
            # for its lease to run out.
            handed_back = [
                (await client.get(f"/v1/jobs/{job_id}")).json() for job_id in (stubborn, cooperative)
            ]
            finished = (await client.get(f"/v1/jobs/{short}")).json()
            cooperative_events = await state_events(db, cooperative)
            stubborn_events = await state_events(db, stubborn)

            stack.start("worker-2", "worker")
            finals = [
                await wait_for_status(client, job_id, {"succeeded", "failed"}, JOB_TIMEOUT_S)
                for job_id in (stubborn, cooperative)
            ]
            async with db.reading() as session:
                records = [await session.run_sync(load_job, job_id) for job_id in (stubborn, cooperative)]
    finally:
        await db.close()

    assert worker.returncode == 0
    assert DRAIN_GRACE_S <= stopped_in_s < DRAIN_GRACE_S + STOP_SLACK_S, stopped_in_s
    assert (finished["status"], finished["attempts"]) == ("succeeded", 1)
    for job in handed_back:
        assert job["status"] == "queued", job
        assert job["attempts"] == 1
        assert job["error"]["type"] == HANDED_BACK
        assert job["max_attempts"] == 4, "the handed-back attempt does not count against the job"
    # The cooperative job was handed back as soon as it stopped, the stubborn one after the grace.
    cooperative_back, stubborn_back = cooperative_events[-1], stubborn_events[-1]
    assert (cooperative_back.status.value, stubborn_back.status.value) == ("queued", "queued")
    assert (stubborn_back.at - cooperative_back.at).total_seconds() > DRAIN_GRACE_S - 2
    assert [record["job_id"] for record in worker_events(stack, "job.interrupted")] == [stubborn]

    for final, record in zip(finals, records, strict=True):
        assert (final["status"], final["attempts"]) == ("succeeded", 2)
        assert record is not None and record.worker_id is not None
        assert f"-{stack.processes['worker-2'].pid}-" in record.worker_id
    # Handed back, not reaped: no lease ran out. And the offsets were committed before the worker
    # left, so the new worker read only the new messages: none of the old ones to skip.
    assert worker_events(stack, "lease.expired", worker="worker-2") == []
    assert worker_events(stack, "job.skipped", worker="worker-2") == []


def exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


async def test_a_job_handed_back_by_drain_after_drain_stops_getting_free_attempts(
    stack: Stack, database_url: str
) -> None:
    """Scale-in after scale-in: every worker that takes the long job is stopped while it runs. The first
    hand-backs are free and immediate; the one past MAX_FREE_HAND_BACKS counts, and the job waits."""
    db = Database(database_url)
    worker = "worker-1"
    try:
        async with stack.client() as client:
            job_id = (await submit(client, sleep_job(120)))["id"]
            for hand_back in range(1, MAX_FREE_HAND_BACKS + 2):

                async def running_its_attempt(attempt: int = hand_back) -> bool:
                    job = (await client.get(f"/v1/jobs/{job_id}")).json()
                    return bool(job["status"] == "running" and job["attempts"] == attempt)

                await eventually(running_its_attempt, JOB_TIMEOUT_S, f"attempt {hand_back} to run")
                process = stack.processes[worker]
                process.send_signal(signal.SIGTERM)
                await eventually(
                    functools.partial(exited, process), DRAIN_GRACE_S + STOP_SLACK_S, f"{worker} to exit"
                )
                if hand_back <= MAX_FREE_HAND_BACKS:
                    worker = f"worker-{hand_back + 1}"
                    stack.start(worker, "worker")
            final = (await client.get(f"/v1/jobs/{job_id}")).json()
        async with db.reading() as session:
            record = await session.run_sync(load_job, job_id)
    finally:
        await db.close()

    assert final["status"] == "scheduled", final
    assert final["error"]["type"] == HANDED_BACK
    assert record is not None and record.hand_backs == MAX_FREE_HAND_BACKS + 1
    # Free hand-backs gave their attempts back; the last one did not.
    assert record.max_attempts == DEFAULT_MAX_ATTEMPTS + MAX_FREE_HAND_BACKS
