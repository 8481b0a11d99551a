"""Scheduling, cancels and timeouts, on real Kafka and both databases.

Times are taken from the worker's own log (JSON, UTC timestamps) and compared with the test's clock:
the services run on this machine, so "the handler stopped within a second of the cancel" is measured,
not hoped for.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from harness import Stack, at, eventually, submit, wait_for_status, worker_events

# The module's workers give a canceled handler this long to stop by itself (production: 10 s).
GRACE_S = 1.0
DELAY_S = 2.0
# A job is queued by the first scheduler look after its `run_at` (twice a second), then goes through
# Kafka to a worker: it should start within about a second; this much leaves room for a slow machine.
START_SLACK_S = 2.0
# The worker looks for cancels twice a second; a cooperative handler stops at once after that.
CANCEL_SLACK_S = 2.0
JOB_TIMEOUT_S = 30
TERMINAL = {"succeeded", "failed", "canceled"}


pytestmark = pytest.mark.stack_settings(
    CONVEYOR_CANCEL_GRACE_S=GRACE_S,
    CONVEYOR_LOG_JSON="true",
    # `job.started` and `job.recorded`, the lines every job logs, are at DEBUG.
    CONVEYOR_LOG_LEVEL="DEBUG",
    # One job at a time, so a running job keeps the next one queued for as long as a test needs.
    CONVEYOR_WORKER_CONCURRENCY=1,
)


async def cancel(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "canceled"
    return job


async def start_running(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a job and wait until its handler runs (it has reported progress, or at least started)."""
    job = await submit(client, body)
    return await wait_for_status(client, job["id"], {"running"}, JOB_TIMEOUT_S)


async def test_a_delayed_job_is_scheduled_then_runs_on_time(stack: Stack) -> None:
    async with stack.client() as client:
        job = await submit(client, {"type": "demo.echo", "payload": {"n": 1}, "delay_s": DELAY_S})
        assert job["status"] == "scheduled"
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "scheduled"
        # A `run_at` in the past (clocks differ) means at once: the job is queued, not scheduled.
        submitted = datetime.now(UTC)
        past = (submitted - timedelta(minutes=5)).isoformat()
        overdue = await submit(client, {"type": "demo.echo", "payload": {"n": 2}, "run_at": past})
        assert overdue["status"] == "queued"

        overdue_final = await wait_for_status(client, overdue["id"], TERMINAL, JOB_TIMEOUT_S)
        final = await wait_for_status(client, job["id"], TERMINAL, JOB_TIMEOUT_S)

    assert overdue_final["status"] == "succeeded"
    assert at(overdue_final["started_at"]) < submitted + timedelta(seconds=START_SLACK_S)
    assert final["status"] == "succeeded"
    assert final["result"] == {"n": 1}
    assert final["attempts"] == 1
    run_at, started_at = at(final["run_at"]), at(final["started_at"])
    assert run_at <= started_at < run_at + timedelta(seconds=START_SLACK_S)
    assert [record["job_id"] for record in worker_events(stack, "job.due", job["id"])] == [job["id"]]


async def test_racing_schedulers_queue_each_due_job_once(stack: Stack) -> None:
    stack.start("worker-2", "worker")
    await eventually(lambda: worker_events(stack, "worker.started", worker="worker-2"), 60, "worker-2")
    async with stack.client() as client:
        jobs = [
            await submit(client, {"type": "demo.echo", "payload": {"i": i}, "delay_s": 1}) for i in range(12)
        ]
        finals = [await wait_for_status(client, job["id"], TERMINAL, JOB_TIMEOUT_S) for job in jobs]

    assert [final["status"] for final in finals] == ["succeeded"] * len(jobs)
    assert [final["attempts"] for final in finals] == [1] * len(jobs)
    for job in jobs:
        queued_by = [
            worker
            for worker in ("worker-1", "worker-2")
            for _ in worker_events(stack, "job.due", job["id"], worker=worker)
        ]
        assert len(queued_by) == 1, f"job {job['id']} queued by {queued_by}"


async def test_canceling_a_running_job_stops_its_handler_within_a_second(stack: Stack) -> None:
    async with stack.client() as client:
        job = await start_running(client, {"type": "demo.sleep", "payload": {"seconds": 30, "steps": 30}})
        canceled_at = datetime.now(UTC)
        await cancel(client, job["id"])

        (stopped,) = await eventually(
            lambda: worker_events(stack, "job.canceled", job["id"]), GRACE_S + 5, "the handler to stop"
        )
        final = (await client.get(f"/v1/jobs/{job['id']}")).json()

    assert at(stopped["timestamp"]) - canceled_at < timedelta(seconds=CANCEL_SLACK_S)
    assert stopped["interrupted"] is False, "demo.sleep stops by itself, within the grace period"
    assert final["status"] == "canceled"
    assert final["result"] is None
    assert final["error"] is None
    assert final["attempts"] == 1
    assert (final["progress"]["percent"] or 0) < 100
    assert worker_events(stack, "job.recorded", job["id"]) == [], "a canceled attempt records nothing"


async def test_a_handler_that_ignores_the_cancel_is_interrupted_after_the_grace(stack: Stack) -> None:
    async with stack.client() as client:
        job = await start_running(client, {"type": "demo.stubborn", "payload": {"seconds": 60}})
        canceled_at = datetime.now(UTC)
        await cancel(client, job["id"])

        (interrupted,) = await eventually(
            lambda: worker_events(stack, "job.interrupted", job["id"]), GRACE_S + 5, "the interruption"
        )
        (stopped,) = await eventually(
            lambda: worker_events(stack, "job.canceled", job["id"]), 5, "the handler to stop"
        )
        # The worker's only slot is free again: the next job runs.
        after = await submit(client, {"type": "demo.echo"})
        after_final = await wait_for_status(client, after["id"], TERMINAL, JOB_TIMEOUT_S)
        final = (await client.get(f"/v1/jobs/{job['id']}")).json()

    waited = at(interrupted["timestamp"]) - canceled_at
    assert timedelta(seconds=GRACE_S) <= waited < timedelta(seconds=GRACE_S + CANCEL_SLACK_S)
    assert stopped["interrupted"] is True
    assert final["status"] == "canceled"
    assert final["result"] is None
    assert after_final["status"] == "succeeded"


async def test_a_job_canceled_before_it_runs_never_runs(stack: Stack) -> None:
    async with stack.client() as client:
        scheduled = await submit(client, {"type": "demo.echo", "delay_s": 1})
        await cancel(client, scheduled["id"])
        # The worker runs one job at a time: while this one runs, the next stays queued.
        blocker = await start_running(client, {"type": "demo.sleep", "payload": {"seconds": 30, "steps": 30}})
        queued = await submit(client, {"type": "demo.echo"})
        assert queued["status"] == "queued"
        await cancel(client, queued["id"])
        await cancel(client, blocker["id"])

        # The worker gets the queued job's message once its slot is free, and skips it.
        await eventually(lambda: worker_events(stack, "job.skipped", queued["id"]), JOB_TIMEOUT_S, "the skip")
        # A job scheduled after the canceled one ran: the scheduler has passed the canceled one's run_at.
        later = await submit(client, {"type": "demo.echo", "delay_s": 1})
        assert (await wait_for_status(client, later["id"], TERMINAL, JOB_TIMEOUT_S))["status"] == "succeeded"
        finals = [(await client.get(f"/v1/jobs/{job['id']}")).json() for job in (scheduled, queued)]

    for final in finals:
        assert final["status"] == "canceled"
        assert final["attempts"] == 0
        assert final["started_at"] is None
        assert worker_events(stack, "job.started", final["id"]) == []
    assert worker_events(stack, "job.due", scheduled["id"]) == []


async def test_an_attempt_past_its_timeout_fails_timed_out_and_is_retried(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    async with stack.client() as client:
        started = loop.time()
        job = await submit(
            client,
            {"type": "demo.sleep", "payload": {"seconds": 30, "steps": 3}, "timeout_s": 1, "max_attempts": 2},
        )
        final = await wait_for_status(client, job["id"], TERMINAL, JOB_TIMEOUT_S)
        elapsed = loop.time() - started

    assert final["status"] == "failed"
    assert final["attempts"] == 2
    assert final["error"]["type"] == "timed_out"
    assert final["error"]["message"] == "the attempt ran longer than its timeout of 1 s"
    assert final["error"]["attempt"] == 2
    assert [record["attempt"] for record in worker_events(stack, "job.timed_out", job["id"])] == [1, 2]
    assert elapsed < 15, "two attempts of 1 s, not of 30 s"
