"""The SDK (`conveyor.client`) against a real stack: every call, its errors from real answers, the
live events across a dropped connection, and submissions retried without making a second job."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from conveyor.client import (
    NO_RETRIES,
    AsyncClient,
    Client,
    Conflict,
    Event,
    Forbidden,
    JobCanceled,
    JobFailed,
    JobStatus,
    NotFound,
    RateLimited,
    ResultNotReady,
    RetryPolicy,
    Submission,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)

from harness import KEY_A, KEY_B, TENANT_A, TENANT_B, Stack, database_refusing_writes, eventually
from tcp_proxy import TcpProxy

READ_ONLY_TENANT, READ_ONLY_KEY = "tenant-r", "key-r-0123456789abcdefghij"
WITHIN_S = 60


def client_of(
    stack: Stack, key: str = KEY_A, *, events_url: str | None = None, retry: RetryPolicy | None = None
) -> AsyncClient:
    return AsyncClient(stack.gateway_url, api_key=key, events_url=events_url, retry=retry)


def marker() -> dict[str, str]:
    """A label no other test's jobs carry, to find this test's jobs by."""
    return {"case": uuid.uuid4().hex}


@pytest.fixture(scope="module")
async def limited_gateway(module_stack: Stack) -> AsyncIterator[str]:
    """A second gateway on the module's stack, where tenant-b may have one job waiting and a third
    key holds the read scope alone."""
    url = module_stack.start_gateway(
        "gateway-limited",
        CONVEYOR_TENANT_LIMITS=json.dumps({TENANT_B: {"max_queued": 1}}),
        CONVEYOR_API_KEYS=f"{TENANT_A}:{KEY_A},{TENANT_B}:{KEY_B},{READ_ONLY_TENANT}:{READ_ONLY_KEY}:read",
    )
    await module_stack.wait_ready(url)
    yield url
    module_stack.stop("gateway-limited")


async def test_submit_wait_and_result(module_stack: Stack) -> None:
    async with client_of(module_stack) as client:
        job = await client.submit("demo.echo", {"hello": "world"}, priority=2, labels={"team": "sdk"})
        assert job.status in {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED}
        assert (job.type, job.priority, job.labels) == ("demo.echo", 2, {"team": "sdk"})
        assert job.links.self == f"/v1/jobs/{job.id}"
        done = await client.wait(job.id, timeout=WITHIN_S)
        assert done.status is JobStatus.SUCCEEDED and done.finished
        assert done.result == {"hello": "world"}
        assert await client.result(job.id) == {"hello": "world"}
        assert (await client.get(job.id)).model_dump() == done.model_dump()


async def test_wait_gives_up_after_its_timeout(module_stack: Stack) -> None:
    async with client_of(module_stack) as client:
        job = await client.submit("demo.echo", "later", delay_s=3600)
        with pytest.raises(TimeoutError):
            await client.wait(job.id, timeout=1.5)
        with pytest.raises(ResultNotReady) as not_ready:
            await client.result(job.id)
        assert not_ready.value.job_status == "scheduled"
        await client.cancel(job.id)


async def test_cancel_a_running_job(module_stack: Stack) -> None:
    async with client_of(module_stack) as client:
        job = await client.submit("demo.sleep", {"seconds": 30, "steps": 30})
        events = client.events(job)
        async for event in events:
            if event.status is JobStatus.RUNNING:
                break
        await events.aclose()  # type: ignore[attr-defined]
        canceled = await client.cancel(job.id)
        assert canceled.status is JobStatus.CANCELED
        assert (await client.wait(job.id, timeout=WITHIN_S)).status is JobStatus.CANCELED
        with pytest.raises(JobCanceled) as no_result:
            await client.result(job.id)
        assert no_result.value.status == 409
        with pytest.raises(Conflict) as again:
            await client.cancel(job.id)
        assert again.value.problem.slug == "job-finished"
        assert again.value.job_status == "canceled"


async def test_retry_a_failed_job(module_stack: Stack) -> None:
    async with client_of(module_stack) as client:
        job = await client.submit("demo.fail", {"fail_times": 1}, max_attempts=1)
        failed = await client.wait(job.id, timeout=WITHIN_S)
        assert failed.status is JobStatus.FAILED
        assert failed.error is not None and failed.error.type == "DemoFailure"
        with pytest.raises(JobFailed) as no_result:
            await client.result(job.id)
        assert no_result.value.error is not None
        assert no_result.value.error.type == "DemoFailure"
        retried = await client.retry(job.id, attempts=2)
        assert retried.status is JobStatus.QUEUED and retried.max_attempts == 3
        assert (await client.wait(job.id, timeout=WITHIN_S)).status is JobStatus.SUCCEEDED
        assert await client.result(job.id) == {"attempts": 2}
        with pytest.raises(Conflict) as not_failed:
            await client.retry(job.id)
        assert not_failed.value.problem.slug == "job-not-failed"


async def test_list_walks_every_page(module_stack: Stack) -> None:
    labels = marker()
    async with client_of(module_stack) as client:
        jobs = await client.submit_many(
            [Submission(type="demo.echo", payload=n, labels=labels) for n in range(5)]
            + [{"type": "demo.noop", "labels": labels}]
        )
        assert [job.type for job in jobs] == ["demo.echo"] * 5 + ["demo.noop"]
        listed = [job async for job in client.list(label=labels, page_size=2)]
        assert sorted(job.id for job in listed) == sorted(job.id for job in jobs)
        assert [job.created_at for job in listed] == sorted((job.created_at for job in listed), reverse=True)
        echoes = [job async for job in client.list(label=labels, type="demo.echo", page_size=2, limit=3)]
        assert len(echoes) == 3 and {job.type for job in echoes} == {"demo.echo"}
        noops = [job async for job in client.list(label=labels, type=["demo.noop", "demo.sleep"])]
        assert [job.id for job in noops] == [jobs[5].id]


async def test_events_resume_across_a_dropped_connection_without_gap_or_repeat(module_stack: Stack) -> None:
    progress = urlsplit(module_stack.progress_url)
    assert progress.hostname is not None and progress.port is not None
    proxy = TcpProxy(progress.hostname, progress.port)
    await proxy.start()
    try:
        async with client_of(module_stack, events_url=f"ws://127.0.0.1:{proxy.port}") as client:
            job = await client.submit("demo.sleep", {"seconds": 4, "steps": 8})
            events: list[Event] = []
            async for event in client.events(job.id):
                events.append(event)
                if event.type == "progress" and event.progress.percent == 25:
                    proxy.cut()  # and the events of the next moments happen while it is away
    finally:
        await proxy.stop()
    assert proxy.connections >= 2, "the stream never reconnected"
    assert events[0].type == "snapshot" and events[0].job is not None
    assert events[-1].status is JobStatus.SUCCEEDED and events[-1].result == {"slept_s": 4.0, "steps": 8}
    covered = [events[0].seq]
    for event in events[1:]:
        covered.extend(range(event.coalesced_from or event.seq, event.seq + 1))
    assert covered == list(range(events[0].seq, events[-1].seq + 1)), [e.seq for e in events]
    assert [e.progress.percent for e in events if e.type == "progress"][-1] == 100


async def test_events_after_seq_and_of_a_finished_job(module_stack: Stack) -> None:
    async with client_of(module_stack) as client:
        job = await client.submit("demo.sleep", {"seconds": 0.5, "steps": 2})
        await client.wait(job.id, timeout=WITHIN_S)
        [snapshot] = [event async for event in client.events(job)]  # finished: the snapshot says all
        assert snapshot.type == "snapshot" and snapshot.terminal
        replay = [event async for event in client.events(job.id, after_seq=1)]
        assert [event.seq for event in replay] == list(range(2, snapshot.seq + 1))
        with pytest.raises(NotFound):
            [event async for event in client.events(str(uuid.uuid4()))]


async def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_job(module_stack: Stack) -> None:
    gateway = urlsplit(module_stack.gateway_url)
    assert gateway.hostname is not None and gateway.port is not None
    proxy = TcpProxy(gateway.hostname, gateway.port)
    await proxy.start()
    labels = marker()
    try:
        proxy.drop_next_response()
        async with AsyncClient(f"http://127.0.0.1:{proxy.port}", api_key=KEY_A) as client:
            job = await client.submit("demo.echo", "once", labels=labels)
    finally:
        await proxy.stop()
    assert proxy.dropped_responses == 1 and proxy.connections == 2
    async with client_of(module_stack) as client:
        assert [listed.id async for listed in client.list(label=labels)] == [job.id]


async def test_errors_from_real_answers(module_stack: Stack, limited_gateway: str) -> None:
    async with AsyncClient(module_stack.gateway_url, api_key="not-a-key-0123456789") as stranger:
        with pytest.raises(Unauthorized) as unauthorized:
            await stranger.get(str(uuid.uuid4()))
    assert unauthorized.value.status == 401 and unauthorized.value.problem.slug == "unauthorized"

    async with AsyncClient(limited_gateway, api_key=READ_ONLY_KEY) as reader:
        with pytest.raises(Forbidden) as forbidden:
            await reader.submit("demo.echo", 1)
        assert "submit" in (forbidden.value.problem.detail or "")
        assert (await reader.stats()).totals.queued == 0  # reading is allowed

    async with client_of(module_stack) as client:
        with pytest.raises(NotFound) as not_found:
            await client.get(str(uuid.uuid4()))
        assert not_found.value.problem.slug == "job-not-found"
        with pytest.raises(ValidationFailed) as invalid:
            await client.submit("no.such.type", {})
        assert [error["field"] for error in invalid.value.errors] == ["type"]
        with pytest.raises(ValidationFailed) as bad_payload:
            await client.submit("demo.sleep", {"seconds": "long"})
        assert [error["field"] for error in bad_payload.value.errors] == ["payload.seconds"]

    async with AsyncClient(limited_gateway, api_key=KEY_B, retry=NO_RETRIES) as limited:
        waiting = await limited.submit("demo.echo", "later", delay_s=3600)
        try:
            with pytest.raises(RateLimited) as limited_error:
                await limited.submit("demo.echo", "one too many")
            assert limited_error.value.status == 429
            assert limited_error.value.limit == "max_queued"
            assert limited_error.value.retry_after is not None and limited_error.value.retry_after > 0
        finally:
            await limited.cancel(waiting.id)

    async with AsyncClient("http://127.0.0.1:1", api_key=KEY_A, retry=NO_RETRIES) as nowhere:
        with pytest.raises(Unavailable) as unreachable:
            await nowhere.get(str(uuid.uuid4()))
    assert unreachable.value.problem.title == "Service unreachable"


async def test_stats_count_the_tenants_own_queue(module_stack: Stack) -> None:
    async with client_of(module_stack, key=KEY_B) as other, client_of(module_stack) as client:
        before = await other.stats()
        later = [await other.submit("demo.echo", n, priority=2, delay_s=3600) for n in range(2)]
        done = await other.submit("demo.echo", "now", priority=4)
        await other.wait(done.id, timeout=WITHIN_S)
        await client.submit("demo.echo", "not b's", priority=2, delay_s=3600)
        stats = await other.stats()
        try:
            assert sorted(stats.priorities) == [1, 2, 3, 4, 5]
            assert stats.priorities[2].scheduled == before.priorities[2].scheduled + 2
            assert stats.totals.scheduled == before.totals.scheduled + 2
            assert stats.finished_last_minute.succeeded >= 1
        finally:
            for job in later:
                await other.cancel(job.id)
        after = await other.stats()
        assert after.totals.scheduled == before.totals.scheduled
        assert after.finished_last_minute.canceled >= 2


async def test_the_blocking_client(module_stack: Stack) -> None:
    def use() -> tuple[object, list[str], list[str]]:
        with Client(module_stack.gateway_url, api_key=KEY_A) as client:
            job = client.submit("demo.sleep", {"seconds": 0.5, "steps": 2}, labels={"sync": "yes"})
            statuses = [event.status.value for event in client.events(job)]
            assert client.wait(job.id, timeout=WITHIN_S).status is JobStatus.SUCCEEDED
            listed = [listed.id for listed in client.list(label={"sync": "yes"}, limit=1)]
            return client.result(job.id), statuses, [job.id, *listed]

    result, statuses, (job_id, *listed) = await asyncio.to_thread(use)
    assert result == {"slept_s": 0.5, "steps": 2}
    assert statuses[-1] == "succeeded"
    assert listed == [job_id]


# Last: it makes the module's database refuse writes for a moment.
async def test_a_submit_refused_with_503_is_retried_and_makes_one_job(
    module_stack: Stack, request: pytest.FixtureRequest
) -> None:
    database_url = module_stack.env["CONVEYOR_DATABASE_URL"]
    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    admin_url = request.getfixturevalue("postgres_admin_url") if kind == "postgresql" else None
    labels = marker()
    refusals_before = module_stack.log("gateway").count("http.database_unavailable")
    async with client_of(module_stack, retry=RetryPolicy(max_retries=20)) as client:
        async with database_refusing_writes(kind, database_url, admin_url):
            submitting = asyncio.create_task(client.submit("demo.echo", "after a 503", labels=labels))

            def refused() -> bool:
                return module_stack.log("gateway").count("http.database_unavailable") > refusals_before

            await eventually(refused, WITHIN_S, "the gateway to answer 503")
        job = await asyncio.wait_for(submitting, WITHIN_S)
        assert (await client.wait(job.id, timeout=WITHIN_S)).result == "after a 503"
        assert [listed.id async for listed in client.list(label=labels)] == [job.id]
