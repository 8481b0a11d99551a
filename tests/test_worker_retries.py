"""Failed attempts: retried after an exponential backoff with full jitter, dead-lettered after the
last one, and run again by hand with `POST /v1/jobs/<id>/retry`."""

from __future__ import annotations

import random
import uuid
from datetime import datetime

import pytest
from aiokafka import AIOKafkaConsumer

from conveyor.database import Database
from conveyor.events import DeadLetter
from conveyor.retries import Backoff
from conveyor.topics import dead_letter_topic

from harness import KEY_B, Stack, assert_problem, event_history, eventually, run_cli, wait_for_status

RETRY_BASE_S = 1.0
RETRY_CAP_S = 1.5
JOB_TIMEOUT_S = 60


pytestmark = pytest.mark.stack_settings(CONVEYOR_RETRY_BASE_S=RETRY_BASE_S, CONVEYOR_RETRY_CAP_S=RETRY_CAP_S)


def test_the_backoff_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    backoff = Backoff(base_s=2.0, cap_s=30.0)
    assert [backoff.ceiling_s(attempt) for attempt in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert backoff.ceiling_s(10_000) == 30.0  # no overflow however many attempts


def test_full_jitter_draws_from_the_whole_range() -> None:
    backoff = Backoff(base_s=1.0, cap_s=100.0)
    rng = random.Random(4)
    delays = [backoff.delay_s(4, rng) for _ in range(2000)]
    assert all(0.0 <= delay <= 8.0 for delay in delays)
    assert min(delays) < 0.1 and max(delays) > 7.9  # spread over all of [0, 8], not bunched at the top
    assert 3.5 < sum(delays) / len(delays) < 4.5


async def dead_letters(stack: Stack, job_id: str, count: int) -> list[DeadLetter]:
    """The dead letters of the job on the deployment's dead-letter topic, read from its start."""
    consumer = AIOKafkaConsumer(
        dead_letter_topic(stack.env["CONVEYOR_TOPIC_PREFIX"]),
        bootstrap_servers=stack.env["CONVEYOR_KAFKA_BOOTSTRAP"],
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    found: list[DeadLetter] = []
    try:

        async def read() -> bool:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found.extend(
                    letter
                    for record in records
                    if (letter := DeadLetter.model_validate_json(record.value)).job_id == job_id
                )
            return len(found) >= count

        await eventually(read, 30, f"{count} dead letter(s) of {job_id}")
    finally:
        await consumer.stop()
    return found


async def test_failed_attempts_wait_out_their_backoff_then_the_job_is_dead_lettered(
    stack: Stack, database_url: str
) -> None:
    async with stack.client() as client:
        job = (
            await client.post(
                "/v1/jobs",
                json={
                    "type": "demo.fail",
                    "payload": {"fail_times": 5},
                    "max_attempts": 3,
                    "labels": {"k": "v"},
                },
            )
        ).json()
        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
    assert final["status"] == "failed"
    assert final["attempts"] == 3
    assert final["error"]["type"] == "DemoFailure"
    assert final["links"]["retry"] == f"/v1/jobs/{job['id']}/retry"

    db = Database(database_url)
    try:
        events = [event for event in await event_history(db, job["id"]) if event.type == "state"]
    finally:
        await db.close()
    assert [(event.status.value, event.attempt) for event in events] == [
        ("queued", 0),
        ("running", 1),
        ("scheduled", 1),  # waiting out its backoff, in the database
        ("queued", 1),
        ("running", 2),
        ("scheduled", 2),
        ("queued", 2),
        ("running", 3),
        ("failed", 3),
    ]
    for failed_attempt, waiting, queued in ((1, events[2], events[3]), (2, events[5], events[6])):
        assert waiting.error is not None and waiting.error["attempt"] == failed_attempt
        assert waiting.run_at is not None
        ceiling = Backoff(RETRY_BASE_S, RETRY_CAP_S).ceiling_s(failed_attempt)
        # The retry time is drawn from [failure, failure + ceiling]; it is queued once that time comes
        # (the scheduler looks twice a second), not before.
        assert 0 <= (waiting.run_at - waiting.at).total_seconds() <= ceiling + 0.01
        assert queued.at >= waiting.run_at

    [letter] = await dead_letters(stack, job["id"], 1)
    assert letter.tenant == "tenant-a" and letter.type == "demo.fail"
    assert letter.payload == {"fail_times": 5}
    assert letter.labels == {"k": "v"}
    assert (letter.attempts, letter.max_attempts) == (3, 3)
    assert letter.error is not None and letter.error["type"] == "DemoFailure"
    assert isinstance(letter.failed_at, datetime)


async def test_a_failed_job_retried_by_hand_runs_again_with_more_attempts(stack: Stack) -> None:
    async with stack.client() as client:
        job = (
            await client.post(
                "/v1/jobs", json={"type": "demo.fail", "payload": {"fail_times": 3}, "max_attempts": 1}
            )
        ).json()
        failed = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
        assert failed["status"] == "failed"

        response = await client.post(failed["links"]["retry"], json={"attempts": 5})
        assert response.status_code == 202
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert "retry-after" in response.headers
        retried = response.json()
        assert retried["status"] == "queued"
        assert (retried["attempts"], retried["max_attempts"]) == (1, 6)
        assert retried["finished_at"] is None
        assert retried["links"]["retry"] is None

        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
        assert final["status"] == "succeeded"
        assert final["result"] == {"attempts": 4}  # attempt numbers went on counting: 2 and 3 failed
        # A job that has not failed cannot be retried.
        not_failed = assert_problem(await client.post(failed["links"]["retry"]), 409)
        assert not_failed["job_status"] == "succeeded"

        # With no body it gets as many attempts as a new job of its type (demo.fail: 3).
        job = (
            await client.post(
                "/v1/jobs", json={"type": "demo.fail", "payload": {"fail_times": 9}, "max_attempts": 1}
            )
        ).json()
        await wait_for_status(client, job["id"], {"failed"}, JOB_TIMEOUT_S)
        again = (await client.post(f"/v1/jobs/{job['id']}/retry")).json()
        assert (again["attempts"], again["max_attempts"]) == (1, 4)
        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
        assert (final["status"], final["attempts"]) == ("failed", 4)
    await dead_letters(stack, job["id"], 2)  # each time it failed for good


async def test_retry_is_refused_to_other_tenants_bad_bodies_and_keys_without_submit(stack: Stack) -> None:
    async with stack.client() as client:
        job = (
            await client.post(
                "/v1/jobs", json={"type": "demo.fail", "payload": {"fail_times": 9}, "max_attempts": 1}
            )
        ).json()
        await wait_for_status(client, job["id"], {"failed"}, JOB_TIMEOUT_S)
        path = f"/v1/jobs/{job['id']}/retry"
        for body in ({"attempts": 0}, {"attempts": 101}, {"attempts": "many"}, {"other": 1}):
            problem = assert_problem(await client.post(path, json=body), 422)
            assert problem["errors"], problem
        assert_problem(await client.post("/v1/jobs/not-a-job/retry"), 404)
        queued = (await client.post("/v1/jobs", json={"type": "demo.noop", "delay_s": 60})).json()
        assert assert_problem(await client.post(f"/v1/jobs/{queued['id']}/retry"), 409)["job_status"] == (
            "scheduled"
        )
    async with stack.client(KEY_B) as other:
        assert_problem(await other.post(path), 404)  # exactly like a job that does not exist
    reader = await run_cli(stack, "keys", "create", "--tenant", "tenant-a", "--scopes", "read")
    async with stack.client(reader) as read_only:
        assert_problem(await read_only.post(path), 403)
    async with stack.client() as client:
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "failed"  # untouched
