"""`conveyor run` scales its worker processes on the workers' consumer lag: real processes, the
session's Kafka broker, SQLite.

A backlog raises the count of worker processes within seconds; once the work is low, the workers
drain one at a time back to the minimum, and a job running on a drained worker finishes there (it
never runs twice); a worker killed with SIGKILL while scaled out is restarted and its job runs again
elsewhere; and idle, they are back to the minimum. The tests use a 10 s idle window; that the default
one (60 s) brings them back within two minutes is `tests/test_autoscaling.py`'s, sample by sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import deployment_env
from prometheus_client.parser import text_string_to_metric_families
from tracked_handlers import Attempt, attempts_run

from conveyor.database import Database
from conveyor.models import JOBS

from harness import KEY_A, METRICS_TOKEN, ConveyorRun, alive, descendants, eventually, free_port

TESTS_DIR = str(Path(__file__).resolve().parent)
STARTUP_S = 120.0
STOP_S = 120.0
# What the issue asks: a backlog raises the count within 30 s; back to the minimum within 2 minutes.
SCALE_OUT_WITHIN_S = 30.0
BACK_TO_MINIMUM_WITHIN_S = 120.0
BACKLOG = 400
PARTITIONS = 4
MAXIMUM = 4
# The test's idle window: short, so that the test is, but the same code path as the default.
IDLE_S = 10.0
WORKER_ARGV = "-m conveyor worker"


class ScaledStack(ConveyorRun):
    def __init__(self, env: dict[str, str], directory: Path) -> None:
        super().__init__(env, directory / "run.log")
        self.directory = directory
        self.counts: list[tuple[float, int]] = []

    @property
    def tracked_log(self) -> Path:
        return self.directory / "attempts.log"

    def worker_pids(self) -> list[int]:
        process = self.check_running()
        return sorted(pid for pid, cmd in descendants(process.pid).items() if WORKER_ARGV in cmd)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.gateway, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60
        )

    async def desired_workers(self) -> float:
        """`conveyor_autoscaler_desired_workers`, as `conveyor run` serves it."""
        url = f"http://127.0.0.1:{self.env['CONVEYOR_RUN_METRICS_PORT']}/metrics"
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        answer.raise_for_status()
        [value] = [
            sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples
            if sample.name == "conveyor_autoscaler_desired_workers"
        ]
        return value

    def records(self, event: str) -> list[dict[str, Any]]:
        """The supervisor's (and every service's) JSON log records of `event`, oldest first."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found

    def attempts(self) -> dict[str, list[Attempt]]:
        return attempts_run(self.tracked_log) if self.tracked_log.exists() else {}

    def job(self, seconds: float) -> dict[str, Any]:
        return {"type": "test.tracked", "payload": {"seconds": seconds, "log": str(self.tracked_log)}}

    async def submit_batch(self, client: httpx.AsyncClient, count: int, seconds: float) -> list[str]:
        response = await client.post("/v1/jobs/batch", json={"jobs": [self.job(seconds)] * count})
        assert response.status_code == 202, response.text
        return [item["id"] for item in response.json()["items"]]

    async def submit(self, client: httpx.AsyncClient, seconds: float) -> str:
        response = await client.post("/v1/jobs", json=self.job(seconds))
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    async def count_workers(self) -> None:
        """Record the worker processes' count every half second (a task, until cancelled)."""
        while True:
            self.counts.append((time.monotonic(), len(self.worker_pids())))
            await asyncio.sleep(0.5)


@pytest.fixture
async def scaled_stack(
    kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[ScaledStack]:
    """`conveyor run` on the session's broker, 1 to MAXIMUM workers; a test's
    `@pytest.mark.stack_settings(...)` overrides its settings."""
    env = {
        **deployment_env(kafka_bootstrap, f"sqlite+aiosqlite:///{tmp_path / 'conveyor.db'}", tmp_path),
        "CONVEYOR_PARTITIONS": str(PARTITIONS),
        "CONVEYOR_WORKERS_MIN": "1",
        "CONVEYOR_WORKERS_MAX": str(MAXIMUM),
        "CONVEYOR_WORKERS_IDLE_S": str(IDLE_S),
        "CONVEYOR_RUN_METRICS_PORT": str(free_port()),
        "CONVEYOR_DRAIN_GRACE_S": "15",
        "CONVEYOR_LOG_JSON": "true",
        # The workers import `tracked_handlers` from this folder.
        "PYTHONPATH": os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])),
        "CONVEYOR_HANDLERS": "conveyor.demo,tracked_handlers",
    }
    for mark in request.node.iter_markers("stack_settings"):
        env.update({name: str(value) for name, value in mark.kwargs.items()})
    env.pop("CONVEYOR_WORKERS", None)
    stack = ScaledStack(env, tmp_path)
    stack.start()
    try:
        await eventually(stack.ready, STARTUP_S, "conveyor run to be ready")
        yield stack
    finally:
        _stop(stack)


def _stop(stack: ScaledStack) -> None:
    process = stack.process
    if process is None or process.poll() is not None:
        return
    everything = set(descendants(process.pid))
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    for pid in everything:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def counting(stack: ScaledStack) -> AsyncIterator[None]:
    task = asyncio.create_task(stack.count_workers())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def finished(stack: ScaledStack, job_ids: Iterator[str] | list[str] | set[str]) -> bool:
    attempts = stack.attempts()
    return all(job_id in attempts and attempts[job_id][-1].ended_at is not None for job_id in job_ids)


def at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def pid_of(stack: ScaledStack, service: str, before: float) -> int:
    """The pid `service` had at the moment `before` (a time.time())."""
    started = [r for r in stack.records("supervisor.started") if r["service"] == service and at(r) <= before]
    return int(started[-1]["pid"])


async def keep_in_flight(stack: ScaledStack, client: httpx.AsyncClient, submitted: set[str]) -> None:
    """Keep some 3 s jobs running, fewer as the workers go: a low load the policy scales in under
    (up to 3 per worker that would stay), so that a drained worker is likely to be running one."""
    while True:
        attempts = stack.attempts()
        in_flight = [
            job_id for job_id in submitted if job_id not in attempts or attempts[job_id][-1].ended_at is None
        ]
        if len(in_flight) < max(1, (len(stack.worker_pids()) - 1) * 3):
            submitted.add(await stack.submit(client, 3.0))
        await asyncio.sleep(0.2)


async def test_a_backlog_scales_out_and_low_load_drains_back_to_the_minimum_running_no_job_twice(
    scaled_stack: ScaledStack,
) -> None:
    stack = scaled_stack
    await eventually(lambda: len(stack.worker_pids()) == 1, 60, "one worker (the minimum)")
    async with counting(stack), stack.client() as client:
        backlog = await stack.submit_batch(client, BACKLOG, 1.0)
        submitted_at = time.monotonic()
        await eventually(lambda: len(stack.worker_pids()) >= 2, SCALE_OUT_WITHIN_S, "a second worker")
        scaled_out_in_s = time.monotonic() - submitted_at
        # Exported too, on `conveyor run`'s own /metrics: the count it wants now.
        assert await stack.desired_workers() >= 2
        await eventually(lambda: finished(stack, backlog), 300, "the backlog to be done")
        backlog_done = time.monotonic()
        peak = max(count for _, count in stack.counts)

        # Low load now: a few 3 s jobs at a time, while the workers drain one by one.
        trickle: set[str] = set()
        feeding = asyncio.create_task(keep_in_flight(stack, client, trickle))
        try:
            await eventually(
                lambda: len(stack.worker_pids()) == 1, BACK_TO_MINIMUM_WITHIN_S, "back to one worker"
            )
        finally:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        back_in_s = time.monotonic() - backlog_done
        await eventually(lambda: finished(stack, trickle), 60, "the last jobs to be done")

    print(
        f"scaled out {scaled_out_in_s:.1f} s after the backlog; peak {peak}; back to 1 in {back_in_s:.1f} s"
    )
    assert 2 <= peak <= MAXIMUM
    assert max(count for _, count in stack.counts) <= MAXIMUM
    # Every job ran exactly once, to its end, and succeeded.
    attempts = stack.attempts()
    jobs = [*backlog, *trickle]
    ran_twice = {job_id: runs for job_id, runs in attempts.items() if len(runs) != 1}
    assert not ran_twice, ran_twice
    assert all(attempts[job_id][0].ended_at is not None for job_id in jobs)
    db = Database(stack.env["CONVEYOR_DATABASE_URL"])
    try:
        async with db.reading() as session:
            rows = (
                await session.execute(JOBS.select().with_only_columns(JOBS.c.status, JOBS.c.attempts))
            ).all()
    finally:
        await db.close()
    assert len(rows) == len(jobs)
    assert {(row.status, row.attempts) for row in rows} == {("succeeded", 1)}

    # Each scale-in drained its worker: it exited by itself (code 0), never killed, nothing handed back.
    retired = stack.records("supervisor.retired")
    assert len(retired) >= peak - 1
    assert {record["code"] for record in retired} == {0}
    assert stack.records("supervisor.kill") == []
    assert stack.records("job.handed_back") == []
    # And at least one drained worker was running a job when it was told to stop: it finished there.
    drained_mid_job = []
    for record in stack.records("supervisor.retiring"):
        told = at(record)
        pid = pid_of(stack, record["service"], told)
        drained_mid_job += [
            job_id
            for job_id, (run,) in attempts.items()
            if run.pid == pid and run.started_at < told < (run.ended_at or 0)
        ]
    assert drained_mid_job, "no scale-in happened while its worker was running a job"
    # The decisions were logged, with the gauge's value.
    decisions = stack.records("autoscaler.decision")
    assert any(r["reason"] == "scale_out" and r["desired_workers"] >= 2 for r in decisions)
    assert any(r["reason"] == "scale_in" and r["desired_workers"] == 1 for r in decisions)


async def test_a_worker_killed_while_scaled_out_is_restarted_and_idle_workers_go_back_to_the_minimum(
    scaled_stack: ScaledStack,
) -> None:
    stack = scaled_stack
    await eventually(lambda: len(stack.worker_pids()) == 1, 60, "one worker (the minimum)")
    async with stack.client() as client:
        jobs = await stack.submit_batch(client, 200, 3.0)
        await eventually(lambda: len(stack.worker_pids()) >= 2, SCALE_OUT_WITHIN_S, "a second worker")
        first = pid_of(stack, "worker-1", time.time())

        def victim() -> tuple[int, str] | None:
            """A job running on a worker the autoscaler added, and that worker's pid."""
            added = set(stack.worker_pids()) - {first}
            for job_id, runs in stack.attempts().items():
                if runs[-1].pid in added and runs[-1].ended_at is None:
                    return runs[-1].pid, job_id
            return None

        pid, job_id = await eventually(victim, 60, "a job on an added worker")
        service = next(r["service"] for r in stack.records("supervisor.started") if r["pid"] == pid)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        await eventually(lambda: finished(stack, [job_id]), 90, f"{job_id} to run again")
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        await eventually(lambda: finished(stack, jobs), 300, "every job to be done")
        # Idle now: back to the minimum, one drained worker at a time.
        idle_since = time.monotonic()
        await eventually(
            lambda: len(stack.worker_pids()) == 1, BACK_TO_MINIMUM_WITHIN_S, "back to one worker"
        )
        print(f"idle: back to one worker in {time.monotonic() - idle_since:.1f} s")

    runs = stack.attempts()[job_id]
    # Attempt 1 died with the worker (or, if it had just ended, was recorded before the kill).
    if runs[0].ended_at is not None and runs[0].ended_at <= killed_at:
        pytest.fail(f"{job_id} had ended before the kill: the test picked a finished job")
    assert [run.attempt for run in runs] == [1, 2]
    assert runs[0].ended_at is None and runs[1].pid != pid
    assert (job["status"], job["attempts"]) == ("succeeded", 2)
    # The supervisor saw the worker die and started it again (unless it was being retired).
    exits = [r for r in stack.records("supervisor.exited") if r["service"] == service]
    assert exits and exits[0]["code"] == -signal.SIGKILL
    restarted = [
        r for r in stack.records("supervisor.started") if r["service"] == service and r["pid"] != pid
    ]
    assert restarted, f"{service} was not started again"
    # A job ran twice only if its first attempt died with the killed worker.
    again = {j: r for j, r in stack.attempts().items() if len(r) != 1}
    assert all(r[0].pid == pid and r[0].ended_at is None and len(r) == 2 for r in again.values()), again
