"""Message limits on the real stack: no payload, result or error text can stop the pipeline.

A payload and a result each have a limit (CONVEYOR_MAX_PAYLOAD_BYTES, CONVEYOR_MAX_RESULT_BYTES), and
Kafka's limits (the producer's max_request_size, the topics' max.message.bytes) are set from them with
room for the rest of a message. This module's limits are just under 1 MiB: a job at the limit makes a
`succeeded` event larger than Kafka's own 1 MiB defaults, which before these limits stopped its
worker's relay, and with it every later message of that worker (claims, events), for good.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from harness import (
    Stack,
    assert_problem,
    assignments,
    collect_events,
    eventually,
    submit,
    wait_for_status,
    worker_events,
)

# Just under the gateway's old 1 MiB body limit, with the submission around it; its event is larger.
MAX_PAYLOAD_BYTES = 1_048_500
NORMAL_JOBS = 30  # over the 3 partitions of two workers: missing one has odds of about 1 in 60,000
# The jobs wait this long before they run, so their sockets are open first and every event is live:
# the big job first, and the others once it has run.
BIG_DELAY_S = 3
NORMAL_DELAY_S = 8
JOB_TIMEOUT_S = 90
WORKERS = ("worker-1", "worker-2")

pytestmark = pytest.mark.stack_settings(
    CONVEYOR_MAX_PAYLOAD_BYTES=MAX_PAYLOAD_BYTES,
    CONVEYOR_MAX_RESULT_BYTES=MAX_PAYLOAD_BYTES,
    CONVEYOR_LOG_JSON="true",
    # `job.recorded`, which says which worker ran a job, is at DEBUG.
    CONVEYOR_LOG_LEVEL="DEBUG",
)


def string_of_json_size(size: int) -> str:
    """A string payload of exactly `size` bytes as JSON (its quotes included)."""
    return "x" * (size - 2)


def echo_job(payload: Any, **fields: Any) -> dict[str, Any]:
    return {"type": "demo.echo", "payload": payload, **fields}


def final_state(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The job as the last message of its stream shows it: a snapshot's job, or an event."""
    last = messages[-1]
    state: dict[str, Any] = last["job"] if last["type"] == "snapshot" else last
    return state


async def both_workers_assigned(stack: Stack) -> bool:
    """Both workers hold partitions, none of them the same: the group has settled with both."""
    latest = [assignments(stack, worker) for worker in WORKERS]
    if not all(latest):
        return False
    owned = [history[-1][1] for history in latest]
    return all(owned) and not owned[0] & owned[1]


async def test_a_job_at_the_payload_limit_then_many_more_all_succeed_and_stream_live(stack: Stack) -> None:
    stack.start("worker-2", "worker")
    await eventually(lambda: both_workers_assigned(stack), 60, "both workers to share the partitions")
    big_payload = string_of_json_size(MAX_PAYLOAD_BYTES)
    async with stack.client() as client:
        big = (await submit(client, echo_job(big_payload, max_attempts=1, delay_s=BIG_DELAY_S)))["id"]
        later = [echo_job({"n": n}, delay_s=NORMAL_DELAY_S) for n in range(NORMAL_JOBS)]
        normal = [(await submit(client, body))["id"] for body in later]
        streams = await asyncio.wait_for(
            asyncio.gather(*(collect_events(stack, job_id) for job_id in [big, *normal])), JOB_TIMEOUT_S
        )
        for job_id, (messages, code) in zip([big, *normal], streams, strict=True):
            assert code == 1000, f"job {job_id}'s stream ended with {code}"
            assert messages[0]["type"] == "snapshot" and messages[0]["job"]["status"] == "scheduled"
            last = messages[-1]
            assert (last["type"], last["status"]) == ("state", "succeeded"), f"job {job_id}: {last}"
        assert streams[0][0][-1]["result"] == big_payload, "the big result reached the socket whole"
        assert (await wait_for_status(client, big, {"succeeded"}, 10))["result"] == big_payload
    # The normal jobs ran on both workers: the one that ran the big job went on publishing too.
    for worker in WORKERS:
        ran = {record["job_id"] for record in worker_events(stack, "job.recorded", worker=worker)}
        assert ran & set(normal), f"{worker} ran none of the normal jobs"


async def test_a_payload_over_the_limit_is_refused_naming_the_payload(stack: Stack) -> None:
    async with stack.client() as client:
        over = {"type": "demo.echo", "payload": string_of_json_size(MAX_PAYLOAD_BYTES + 1)}
        body = assert_problem(await client.post("/v1/jobs", json=over), 413)
        assert body["errors"] == [
            {"field": "payload", "message": f"at most {MAX_PAYLOAD_BYTES} bytes as JSON"}
        ]
        batch = {"jobs": [{"type": "demo.echo", "payload": {}}, over]}
        body = assert_problem(await client.post("/v1/jobs/batch", json=batch), 422)
        assert [error["field"] for error in body["errors"]] == ["jobs[1].payload"]  # type: ignore[union-attr]


@pytest.mark.stack_settings(CONVEYOR_MAX_RESULT_BYTES=2048)
async def test_a_result_over_the_limit_fails_the_attempt_as_result_too_large(stack: Stack) -> None:
    async with stack.client() as client:
        job = await submit(client, echo_job("y" * 5000, max_attempts=1))
        messages, _ = await asyncio.wait_for(collect_events(stack, job["id"]), JOB_TIMEOUT_S)
        assert final_state(messages)["status"] == "failed"
        failed = await wait_for_status(client, job["id"], {"failed"}, 10)
    assert failed["result"] is None
    assert failed["error"]["type"] == "result_too_large"
    assert "5002 bytes" in failed["error"]["message"] and "2048" in failed["error"]["message"]


async def test_a_failed_attempt_shows_its_error_without_the_traceback(stack: Stack) -> None:
    async with stack.client() as client:
        job = await submit(client, {"type": "demo.fail", "payload": {"fail_times": 1}, "max_attempts": 1})
        failed = await wait_for_status(client, job["id"], {"failed"}, JOB_TIMEOUT_S)
        messages, _ = await asyncio.wait_for(collect_events(stack, job["id"]), JOB_TIMEOUT_S)
    expected: dict[str, Any] = {
        "type": "DemoFailure",
        "message": "failing on purpose: attempt 1 of the first 1",
        "attempt": 1,
    }
    assert failed["error"] == expected
    assert final_state(messages)["error"] == expected, "the stream shows what the resource shows"
    # The traceback is the worker's: in its log line of the failed attempt.
    [record] = worker_events(stack, "job.attempt_failed", job["id"])
    assert "Traceback (most recent call last)" in record["exception"]
    assert "in fail\n    raise DemoFailure" in record["exception"]
