"""Accepted means durable: a 202 is a promise the job runs, whatever fails after it; a failure before it
accepts nothing.

Each test runs real processes on both databases: a gateway killed between its commit and its publish,
Kafka stopped and started again under a running stack, and the database refusing connections.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conveyor.database import Database
from conveyor.embedded.kafka import KafkaCluster
from conveyor.models import Job

from harness import (
    PROBLEM_JSON,
    Stack,
    database_refusing_writes,
    eventually,
    outbox_size,
    sleep_job,
    submit,
    wait_alive,
    wait_for_status,
)

# Outbox rows count as orphans after 10 s (conveyor.outbox.ORPHAN_AGE_S); then any live relay sweeps them.
ORPHAN_SWEEP_WITHIN_S = 60
# A restarted broker must be found again by every producer and consumer, each on its own backoff.
KAFKA_RECOVERY_WITHIN_S = 120
DONE = {"succeeded", "failed", "cancelled"}
# A service stopping while Kafka is down gives each broker call a few seconds, then gives up on it.
STOP_WITHIN_S = 30


@asynccontextmanager
async def database_at(database_url: str) -> AsyncIterator[Database]:
    """The deployment's database, opened for one look (the services may be restarting around it)."""
    db = Database(database_url)
    try:
        yield db
    finally:
        await db.close()


async def outbox_size_at(database_url: str) -> int:
    async with database_at(database_url) as db:
        return await outbox_size(db)


async def outbox_size_is(database_url: str, size: int) -> bool:
    return await outbox_size_at(database_url) == size


async def stored_jobs(database_url: str) -> list[Job]:
    async with database_at(database_url) as db, db.reading() as session:
        return list((await session.scalars(select(Job))).all())


@dataclass(frozen=True)
class Accepted:
    id: str
    payload: Any


async def submit_echo(client: httpx.AsyncClient, payload: Any) -> Accepted:
    job = await submit(client, {"type": "demo.echo", "payload": payload})
    return Accepted(job["id"], payload)


async def all_succeed(client: httpx.AsyncClient, jobs: list[Accepted], within_s: float) -> None:
    """Every job succeeds, with its own payload echoed back as its result."""
    finals = await asyncio.gather(*(wait_for_status(client, job.id, DONE, within_s) for job in jobs))
    assert [(final["status"], final["result"]) for final in finals] == [
        ("succeeded", job.payload) for job in jobs
    ], finals


async def statuses(client: httpx.AsyncClient, jobs: list[Accepted]) -> list[str]:
    return [(await client.get(f"/v1/jobs/{job.id}")).json()["status"] for job in jobs]


async def test_jobs_accepted_by_a_gateway_killed_before_publishing_still_run(
    stack: Stack, database_url: str
) -> None:
    # A second gateway on the same database and topics whose Kafka is unreachable: it commits each job
    # and answers 202, but its relay can never publish, so the messages stay in the outbox.
    doomed_url = stack.start_gateway("gateway-no-kafka", CONVEYOR_KAFKA_BOOTSTRAP="127.0.0.1:1")
    await wait_alive(doomed_url)
    async with stack.client(base_url=doomed_url) as doomed:
        jobs = [await submit_echo(doomed, {"n": n}) for n in range(5)]

    async with stack.client() as client:
        # Well within the orphan age: nothing can have published them yet.
        assert await statuses(client, jobs) == ["queued"] * len(jobs)
        assert await outbox_size_at(database_url) >= 2 * len(jobs)  # an event and a job message each
        stack.kill("gateway-no-kafka")

        await all_succeed(client, jobs, ORPHAN_SWEEP_WITHIN_S)
    await eventually(
        lambda: outbox_size_is(database_url, 0), 30, "the outbox to be empty once everything is published"
    )


async def test_jobs_accepted_while_kafka_is_down_run_once_it_is_back(
    private_kafka: KafkaCluster, private_kafka_stack: Stack
) -> None:
    async with private_kafka_stack.client() as client:
        before = [await submit_echo(client, {"before": n}) for n in range(3)]
        await all_succeed(client, before, 60)

        await asyncio.to_thread(private_kafka.stop)
        assert not private_kafka.is_running
        during = [await submit_echo(client, {"during": n}) for n in range(5)]
        assert await statuses(client, during) == ["queued"] * len(during)

        # The same broker again: same ports, same data directory, so the same topics and offsets.
        await asyncio.to_thread(private_kafka.start)
        await all_succeed(client, during, KAFKA_RECOVERY_WITHIN_S)

        after = [await submit_echo(client, {"after": n}) for n in range(2)]
        await all_succeed(client, after, 60)


# A worker cut off from Kafka this long (longer than a consumer's session) must lose nothing.
KAFKA_OUTAGE_S = 30.0


async def test_a_worker_cut_off_from_kafka_for_30_s_records_its_outcomes_and_resumes(
    private_kafka: KafkaCluster, private_kafka_stack: Stack, database_url: str
) -> None:
    """The jobs running when Kafka goes away finish and are recorded in the database meanwhile (their
    events wait in the outbox); the worker then takes new jobs once Kafka is back."""
    async with private_kafka_stack.client() as client:
        running = [(await submit(client, sleep_job(6)))["id"] for _ in range(3)]
        for job_id in running:
            await wait_for_status(client, job_id, {"running"}, 60)
        await asyncio.to_thread(private_kafka.stop)
        outage_started = asyncio.get_running_loop().time()

        async def recorded() -> bool:
            jobs = {job.id: job for job in await stored_jobs(database_url)}
            return all(jobs[job_id].status == "succeeded" for job_id in running)

        await eventually(recorded, KAFKA_OUTAGE_S, "the running jobs' outcomes while Kafka is down")
        assert await outbox_size_at(database_url) > 0, "their events wait for Kafka"
        remaining_s = KAFKA_OUTAGE_S - (asyncio.get_running_loop().time() - outage_started)
        await asyncio.sleep(max(0.0, remaining_s))
        await asyncio.to_thread(private_kafka.start)

        after = [await submit_echo(client, {"after": n}) for n in range(3)]
        await all_succeed(client, after, KAFKA_RECOVERY_WITHIN_S)
        finals = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in running]
    assert [(job["status"], job["attempts"]) for job in finals] == [("succeeded", 1)] * len(running)


async def test_every_service_stops_promptly_while_kafka_is_down_and_a_drained_job_is_kept(
    private_kafka: KafkaCluster, private_kafka_stack: Stack, database_url: str
) -> None:
    stack = private_kafka_stack
    async with stack.client() as client:
        response = await client.post("/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": 10}})
        job_id = response.json()["id"]
        await wait_for_status(client, job_id, {"running"}, 60)

    await asyncio.to_thread(private_kafka.stop)
    services = {name: stack.processes[name] for name in ("gateway", "worker-1", "progress")}
    for process in services.values():
        process.send_signal(signal.SIGTERM)
    # Each bounds what it asks of the absent broker (commits, leaving the group, last publishes).
    await eventually(
        lambda: all(process.poll() is not None for process in services.values()),
        STOP_WITHIN_S,
        "every service to stop although Kafka is down",
    )
    # uvicorn ends by raising the signal it caught again, once its shutdown is complete.
    clean_exits = {0, -signal.SIGTERM}
    assert all(process.returncode in clean_exits for process in services.values()), services
    for name in services:
        assert "shutdown failed" not in stack.log(name) and "Traceback" not in stack.log(name), name
    # The worker handed its running job back to the database; Kafka being down changes nothing.
    [job] = [job for job in await stored_jobs(database_url) if job.id == job_id]
    assert (job.status, job.attempts, (job.error or {}).get("type")) == ("queued", 1, "handed_back")

    await asyncio.to_thread(private_kafka.start)
    stack.start("worker-2", "worker")

    async def finished() -> Job | None:
        [job] = [job for job in await stored_jobs(database_url) if job.id == job_id]
        return job if job.status in DONE else None

    done = await eventually(finished, KAFKA_RECOVERY_WITHIN_S, "the handed-back job to run again")
    assert (done.status, done.attempts) == ("succeeded", 2)


async def test_a_submission_while_the_database_is_down_gets_503_and_leaves_nothing(
    stack: Stack, database_url: str, database_kind: str, request: pytest.FixtureRequest
) -> None:
    admin_url = request.getfixturevalue("postgres_admin_url") if database_kind == "postgresql" else None
    known = {job.id for job in await stored_jobs(database_url)}
    refused_marker = uuid.uuid4().hex
    # A client of its own: its connection is not reused afterwards, whatever the gateway does with it.
    async with database_refusing_writes(database_kind, database_url, admin_url), stack.client() as client:
        refused = await client.post("/v1/jobs", json={"type": "demo.echo", "payload": refused_marker})

    async with stack.client() as client:
        accepted = await submit_echo(client, "accepted")
        await all_succeed(client, [accepted], 60)

    jobs = await stored_jobs(database_url)
    assert {job.id for job in jobs} - known == {accepted.id}
    assert not [job for job in jobs if job.payload == refused_marker]

    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == PROBLEM_JSON
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["status"] == 503
    assert refused.json()["type"] == "urn:conveyor:problem:dependency-unavailable"
