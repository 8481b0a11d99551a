"""Metrics on real processes: every service serves `/metrics` (for the metrics token only), each worker
on its own port beside `/healthz`, and the series say what happened: jobs submitted, refused, run,
finished and canceled, the queue wait, the slots, the consumer lag read from Kafka, the outbox, the
WebSockets and the delivery of their events, the HTTP requests by route template."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
import websockets
from aiokafka import TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection

from conveyor.backlog import BacklogGauges
from conveyor.broker import create_producer
from conveyor.database import Database
from conveyor.httpmetrics import rejection_reason, token_accepted
from conveyor.lag import job_topic_levels, lag_by_priority
from conveyor.metrics import HistogramTally, JobSeries
from conveyor.models import utcnow
from conveyor.outbox import stage_messages
from conveyor.problems import too_many_requests
from conveyor.settings import Settings
from conveyor.topics import job_topic
from conveyor.topics_setup import ensure_deployment_topics

from harness import (
    KEY_A,
    KEY_B,
    METRIC_SERIES,
    METRICS_TOKEN,
    Stack,
    assert_problem,
    eventually,
    sleep_job,
    submit,
    wait_for_status,
)

JOB_TIMEOUT_S = 90

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, token: str = METRICS_TOKEN) -> Samples:
    """The samples of `url`/metrics, by name and labels."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def rises_to(url: str, name: str, at_least: float, **labels: str) -> Samples | None:
    samples = await scrape(url)
    return samples if value(samples, name, **labels) >= at_least else None


@contextlib.asynccontextmanager
async def socket_of(stack: Stack, job_id: str) -> AsyncIterator[websockets.ClientConnection]:
    url = f"{stack.progress_url}/v1/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with websockets.connect(url, additional_headers=headers, open_timeout=30) as ws:
        yield ws


@pytest.mark.stack_settings(CONVEYOR_TENANT_LIMITS='{"tenant-b": {"max_queued": 1}}')
async def test_every_service_serves_its_series_for_the_metrics_token_only(stack: Stack) -> None:
    progress_http = stack.progress_url.replace("ws://", "http://")
    worker = stack.worker_metrics_url()
    async with httpx.AsyncClient(timeout=10) as client:
        for base in (stack.gateway_url, progress_http, worker):
            # No token, a tenant's API key, a wrong token: the series are every tenant's, so refused.
            for headers in (
                {},
                {"Authorization": f"Bearer {KEY_A}"},
                {"Authorization": f"Bearer {'x' * 30}"},
            ):
                assert_problem(await client.get(f"{base}/metrics", headers=headers), 401)
        # The worker's liveness probe needs no key, as the HTTP services' /healthz.
        assert (await client.get(f"{worker}/healthz")).json() == {"status": "ok"}

    async with stack.client() as client:
        # Refusals by reason: an unknown type (422), no key (401).
        assert (await client.post("/v1/jobs", json={"type": "no.such", "payload": {}})).status_code == 422
        async with httpx.AsyncClient(base_url=stack.gateway_url) as anonymous:
            assert (await anonymous.post("/v1/jobs", json=sleep_job(1))).status_code == 401

        job = await submit(client, sleep_job(3, steps=3))
        async with socket_of(stack, job["id"]) as ws:
            await eventually(lambda: _running(client, job["id"]), JOB_TIMEOUT_S, "the job to run")
            # While it runs: one WebSocket open, one of the worker's slots busy.
            progress = await scrape(progress_http)
            assert value(progress, "conveyor_websocket_connections") == 1
            slots = await scrape(worker)
            assert value(slots, "conveyor_worker_slots", state="busy") == 1
            assert value(slots, "conveyor_worker_slots", state="free") == 7  # of CONVEYOR_WORKER_CONCURRENCY
            messages = [json.loads(raw) async for raw in ws]
        assert messages[-1]["status"] == "succeeded"
        assert (await wait_for_status(client, job["id"], {"succeeded"}, JOB_TIMEOUT_S))[
            "status"
        ] == "succeeded"
        await client.get(f"/v1/jobs/{job['id']}")

        # A scheduled job canceled by its tenant: finished, `canceled`, counted by the gateway.
        later = await submit(client, {**sleep_job(1), "delay_s": 3600})
        assert (await client.post(f"/v1/jobs/{later['id']}/cancel")).status_code == 202
        # A job that fails its only attempt: finished, `failed` (dead-lettered), counted by the worker.
        doomed = await submit(client, {"type": "demo.fail", "payload": {"fail_times": 5}, "max_attempts": 1})
        await wait_for_status(client, doomed["id"], {"failed"}, JOB_TIMEOUT_S)
    # Over its queue limit, tenant B is refused for `max_queued` (the 429 says which limit).
    async with stack.client(KEY_B) as client:
        await submit(client, {**sleep_job(1), "delay_s": 3600})
        refused = await client.post("/v1/jobs", json={**sleep_job(1), "delay_s": 3600})
        assert assert_problem(refused, 429)["limit"] == "max_queued"

    gateway = await scrape(stack.gateway_url)
    assert value(gateway, "conveyor_jobs_submitted_total", type="demo.sleep", priority="3") == 3
    assert value(gateway, "conveyor_jobs_submitted_total", type="demo.fail", priority="3") == 1
    assert value(gateway, "conveyor_jobs_rejected_total", reason="max_queued") == 1
    assert value(gateway, "conveyor_jobs_rejected_total", reason="invalid") == 1
    assert value(gateway, "conveyor_jobs_rejected_total", reason="unauthorized") == 1
    assert value(gateway, "conveyor_jobs_finished_total", type="demo.sleep", outcome="canceled") == 1
    # By route template, never by job id.
    assert value(gateway, "conveyor_http_requests_total", route="/v1/jobs", status="202") == 4
    assert value(gateway, "conveyor_http_requests_total", route="/v1/jobs", status="429") == 1
    assert value(gateway, "conveyor_http_requests_total", route="/v1/jobs/{job_id}", status="200") >= 2
    assert value(gateway, "conveyor_http_request_seconds_count", route="/v1/jobs/{job_id}/cancel") == 1
    assert not any(job["id"] in dict(labels).get("route", "") for _, labels in gateway)

    worker_samples = await eventually(
        lambda: rises_to(worker, "conveyor_jobs_finished_total", 1, type="demo.sleep", outcome="succeeded"),
        30,
        "the worker to count the outcome",
    )
    assert value(worker_samples, "conveyor_jobs_finished_total", type="demo.fail", outcome="failed") == 1
    assert value(worker_samples, "conveyor_job_queue_wait_seconds_count", priority="3") == 2
    assert value(worker_samples, "conveyor_job_run_seconds_count", type="demo.sleep") == 1
    assert value(worker_samples, "conveyor_job_run_seconds_sum", type="demo.sleep") >= 3
    assert value(worker_samples, "conveyor_job_end_to_end_seconds_count") == 2
    assert value(worker_samples, "conveyor_job_end_to_end_seconds_sum") >= 3
    assert value(worker_samples, "conveyor_worker_slots", state="busy") == 0

    # The live events of the job (running, its progress reports, succeeded), each written to the socket;
    # a progress process adds what it tallied at least every TALLY_FLUSH_S.
    progress = await eventually(
        lambda: rises_to(progress_http, "conveyor_event_delivery_seconds_count", 2), 10, "the deliveries"
    )
    assert value(progress, "conveyor_websocket_connections") == 0

    # The deployment's backlog, read by the gateway: nothing waits once the job has run.
    backlog = await eventually(
        lambda: _drained(stack.gateway_url), 60, "the lag and the outbox to be read as empty"
    )
    assert {
        dict(labels)["priority"] for name, labels in backlog if name == "conveyor_consumer_lag_messages"
    } == {
        "1",
        "2",
        "3",
        "4",
        "5",
    }
    # Together, the processes export every series the issue lists.
    every = names(gateway) | names(progress) | names(worker_samples) | names(backlog)
    assert {
        name
        for name in METRIC_SERIES
        if not any(sample == name or sample.startswith(name + "_") for sample in every)
    } == set()


async def _running(client: httpx.AsyncClient, job_id: str) -> bool:
    return bool((await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running")


async def _drained(gateway: str) -> Samples | None:
    samples = await scrape(gateway)
    lag = [v for (name, _), v in samples.items() if name == "conveyor_consumer_lag_messages"]
    empty = (
        value(samples, "conveyor_outbox_rows") == 0
        and value(samples, "conveyor_outbox_oldest_age_seconds") == 0
    )
    return samples if len(lag) == 5 and all(v == 0 for v in lag) and empty else None


@pytest.mark.stack_settings(CONVEYOR_DRAIN_GRACE_S="1")
async def test_the_consumer_lag_counts_what_no_worker_has_taken_yet(stack: Stack) -> None:
    """Read from Kafka by the gateway: the job messages of a priority that the workers' group has not
    committed; back to 0 once a worker has run them."""
    stack.stop("worker-1")
    async with stack.client() as client:
        for _ in range(4):
            await submit(client, {"type": "demo.noop", "payload": {}, "priority": 2})
        await eventually(
            lambda: rises_to(stack.gateway_url, "conveyor_consumer_lag_messages", 4, priority="2"),
            60,
            "a lag of 4 at priority 2",
        )
        samples = await scrape(stack.gateway_url)
        assert value(samples, "conveyor_consumer_lag_messages", priority="2") == 4
        assert value(samples, "conveyor_consumer_lag_messages", priority="3") == 0
        stack.start("worker-1", "worker")
        await eventually(lambda: _drained(stack.gateway_url), 90, "the lag to fall back to 0")


async def _lag_is(gauges: BacklogGauges, priority: int, expected: float) -> bool:
    await gauges.read()
    return (
        REGISTRY.get_sample_value("conveyor_consumer_lag_messages", {"priority": str(priority)}) == expected
    )


async def test_the_backlog_gauges_read_the_outbox_and_kafka(db: Database, kafka_bootstrap: str) -> None:
    """In-process, on the real database and broker: the outbox's rows and the age of its oldest (by the
    database's clock), and the lag of a group that has committed part of a partition."""
    prefix = f"g{utcnow().strftime('%H%M%S%f')}"
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=prefix, partitions=2)
    await ensure_deployment_topics(settings, kafka_bootstrap)
    gauges = BacklogGauges(db, kafka_bootstrap, prefix)
    try:
        await gauges.read()
        assert REGISTRY.get_sample_value("conveyor_outbox_rows") == 0
        assert REGISTRY.get_sample_value("conveyor_outbox_oldest_age_seconds") == 0

        written_at = utcnow() - timedelta(seconds=120)

        def stage(connection: Connection) -> None:
            stage_messages(connection, [("t", "k", b"v", None, None)] * 3, now=written_at)

        await db.write(stage)
        await gauges.read()
        assert REGISTRY.get_sample_value("conveyor_outbox_rows") == 3
        assert 120 <= (REGISTRY.get_sample_value("conveyor_outbox_oldest_age_seconds") or 0) < 180

        producer = create_producer(kafka_bootstrap)
        await producer.start()
        try:
            topic = job_topic(prefix, 4)
            for n in range(5):
                await producer.send_and_wait(topic, b"{}", key=f"job-{n}".encode(), partition=n % 2)
        finally:
            await producer.stop()
        assert await eventually(lambda: _lag_is(gauges, 4, 5), 30, "a lag of 5 at priority 4")
        assert REGISTRY.get_sample_value("conveyor_consumer_lag_messages", {"priority": "1"}) == 0
    finally:
        await gauges.stop()


def test_lag_is_end_minus_committed_or_log_start() -> None:
    p1, p3 = job_topic("x", 1), job_topic("x", 3)
    end = {
        TopicPartition(p1, 0): 10,
        TopicPartition(p1, 1): 7,
        TopicPartition(p3, 0): 4,
        TopicPartition("x.events", 0): 99,
    }
    start = {TopicPartition(p1, 1): 2, TopicPartition(p3, 0): 0}
    committed = {TopicPartition(p1, 0): 6, TopicPartition(p1, 1): -1}
    assert lag_by_priority(job_topic_levels("x"), end, start, committed) == {1: 4 + 5, 2: 0, 3: 4, 4: 0, 5: 0}


def test_a_refusal_is_named_by_its_limit_or_its_status() -> None:
    assert rejection_reason(429, too_many_requests("slow down", 1, "max_queued")) == "max_queued"
    assert rejection_reason(429, too_many_requests("slow down", 1, "rate")) == "rate"
    assert rejection_reason(429, None) == "rate_limited"
    assert rejection_reason(413, None) == "too_large"
    assert rejection_reason(503, None) == "unavailable"
    assert rejection_reason(418, None) == "error"


def test_the_metrics_token_is_needed_and_compared_whole() -> None:
    token = "t" * 30
    assert token_accepted(f"Bearer {token}", token)
    assert not token_accepted(f"Bearer {token[:-1]}", token)
    assert not token_accepted(None, token)
    assert not token_accepted("Bearer ", "")  # no token set: nobody
    assert not token_accepted(f"Basic {token}", token)


def test_a_short_metrics_token_is_refused_without_being_shown() -> None:
    with pytest.raises(ValueError) as refused:
        Settings(metrics_token="short-secret")
    assert "short-secret" not in str(refused.value)


def test_the_tenant_label_is_opt_in() -> None:
    registry = CollectorRegistry()
    with_tenant = JobSeries.build(tenant_label=True, registry=registry)
    with_tenant.submitted.labels("demo.echo", "3", *with_tenant.tenant("acme")).inc()
    with_tenant.observe_end_to_end("acme", 1.5)
    assert (
        registry.get_sample_value(
            "conveyor_jobs_submitted_total", {"type": "demo.echo", "priority": "3", "tenant": "acme"}
        )
        == 1
    )
    assert registry.get_sample_value("conveyor_job_end_to_end_seconds_count", {"tenant": "acme"}) == 1
    plain_registry = CollectorRegistry()
    plain = JobSeries.build(tenant_label=False, registry=plain_registry)
    plain.submitted.labels("demo.echo", "3", *plain.tenant("acme")).inc()
    plain.observe_end_to_end("acme", 1.5)
    assert (
        plain_registry.get_sample_value(
            "conveyor_jobs_submitted_total", {"type": "demo.echo", "priority": "3"}
        )
        == 1
    )
    assert not math.isnan(plain_registry.get_sample_value("conveyor_job_end_to_end_seconds_sum") or 0)


def test_a_tally_flushed_exports_what_observing_each_value_would() -> None:
    observed, tallied = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1)
    direct = Histogram("latency_seconds", "", buckets=buckets, registry=observed)
    tally = HistogramTally(Histogram("latency_seconds", "", buckets=buckets, registry=tallied))
    # On the bounds (a bound is in its own bucket), between them, beyond the last, and at 0.
    values = [0.0, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.5, 1, 7.5, 7.5]
    for amount in values:
        direct.observe(amount)
        tally.observe(amount)
    # Nothing shows before the flush.
    assert _without_created(generate_latest(tallied)) != _without_created(generate_latest(observed))
    tally.flush()
    tally.flush()  # a second flush adds nothing
    assert _without_created(generate_latest(tallied)) == _without_created(generate_latest(observed))
    tally.observe(0.02)
    direct.observe(0.02)
    tally.flush()
    assert _without_created(generate_latest(tallied)) == _without_created(generate_latest(observed))
    tally.observe(0.25, 3)  # one latency for three sockets, as a fan-out counts its writes
    for _ in range(3):
        direct.observe(0.25)
    tally.flush()
    assert _without_created(generate_latest(tallied)) == _without_created(generate_latest(observed))


def _without_created(exposition: bytes) -> list[bytes]:
    return [line for line in exposition.splitlines() if b"_created" not in line]
