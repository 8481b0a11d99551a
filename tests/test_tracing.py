"""Tracing (`conveyor.tracing`): one job's spans, from the gateway's `POST /v1/jobs` through the outbox
relay and Kafka to the worker and the progress service, in one trace with the right parents.

The stack's processes export over OTLP/HTTP to a receiver this test runs (a small HTTP server that
decodes each `ExportTraceServiceRequest` with `opentelemetry-proto`), as they would to a collector.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import websockets
from aiokafka import AIOKafkaConsumer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto

from conveyor import changes, tracing
from conveyor.broker import ensure_topics
from conveyor.changes import NewJob, Unit, write_changes
from conveyor.database import Database
from conveyor.outbox import OutboxRelay, stage_messages
from conveyor.topics import events_topic

from harness import KEY_A, Stack, eventually, sleep_job, submit, wait_for_status, write_now

pytestmark = pytest.mark.stack_settings(CONVEYOR_LOG_LEVEL="DEBUG")

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class Receiver:
    """An OTLP/HTTP trace receiver: every span exported to `endpoint` ends up in `spans`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.received(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def received(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(spans)

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    running.start()
    yield running
    running.stop()


@pytest.fixture
def stack_env(stack_env: dict[str, str], receiver: Receiver) -> dict[str, str]:
    """The deployment's environment, exporting spans to the test's receiver within a fraction of a second."""
    return {**stack_env, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}


def one(spans: list[ReceivedSpan], what: str, **wanted: Any) -> ReceivedSpan:
    found = [span for span in spans if all(getattr(span, name) == value for name, value in wanted.items())]
    assert len(found) == 1, (
        f"{what}: {len(found)} spans match {wanted}, of {[(s.service, s.name) for s in spans]}"
    )
    return found[0]


async def test_one_job_is_one_trace_across_the_services(stack: Stack, receiver: Receiver) -> None:
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    job_topic = f"{prefix}.jobs.p3"
    headers = {"Authorization": f"Bearer {KEY_A}"}
    async with websockets.connect(f"{stack.progress_url}/v1/events", additional_headers=headers) as ws:
        # Watching every job of the tenant before the job exists: each of its events is delivered live.
        await ws.send(json.dumps({"op": "subscribe", "all": True}))
        assert json.loads(await ws.recv())["type"] == "snapshot"
        async with stack.client() as client:
            response = await client.post("/v1/jobs", json=sleep_job(0.6, steps=2))
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            await wait_for_status(client, job_id, "succeeded", 60)
        # Every event of the job, from its first (`queued`) to the terminal one, as the socket got them.
        received: list[dict[str, Any]] = []
        while not received or received[-1]["status"] != "succeeded":
            message = json.loads(await ws.recv())
            if message.get("job_id") == job_id:
                received.append(message)
    # The job's events, by its terminal event's seq: queued, running, its progress reports (a busy
    # database may have coalesced some at the source, a slow socket some more), succeeded.
    event_count = received[-1]["seq"]
    reports = event_count - 3
    assert reports >= 1

    submission = await eventually(
        lambda: next(
            (s for s in receiver.spans if s.name == "POST /v1/jobs" and s.service == "conveyor-gateway"), None
        ),
        30,
        "the gateway's span of the submission",
    )
    assert submission.parent_id == "", "the submission starts the trace"
    assert submission.kind == SpanProto.SPAN_KIND_SERVER
    assert submission.attributes["http.response.status_code"] == 202

    events = f"publish {events_topic(prefix)}"

    def whole_trace() -> list[ReceivedSpan] | None:
        spans = receiver.in_trace(submission.trace_id)
        published = [s for s in spans if s.name == events]
        delivered = [s for s in spans if s.service == "conveyor-progress"]
        # The queued, running, progress and succeeded events: each published and delivered.
        processed = any(s.name == f"process {job_topic}" for s in spans)  # the worker's last span to end
        everything = len(published) >= event_count and len(delivered) >= event_count
        return spans if everything and processed else None

    try:
        spans = await eventually(whole_trace, 30, "every span of the job, up to the progress service")
    except AssertionError:
        seen = [(span.service, span.name, span.parent_id) for span in receiver.in_trace(submission.trace_id)]
        raise AssertionError(f"the trace has only {seen}") from None
    assert {span.service for span in spans} == {"conveyor-gateway", "conveyor-worker", "conveyor-progress"}
    by_id = {span.span_id: span for span in spans}

    # The gateway's relay publishes the job message (and the `queued` event) under the request's span.
    published = one(spans, "the job message's publish", name=f"publish {job_topic}")
    assert published.service == "conveyor-gateway"
    assert published.kind == SpanProto.SPAN_KIND_PRODUCER
    assert published.parent_id == submission.span_id
    assert published.attributes["messaging.kafka.message.key"] == job_id

    # The worker continues the trace from the message's headers.
    process = one(spans, "the worker's processing", name=f"process {job_topic}")
    assert process.service == "conveyor-worker"
    assert process.kind == SpanProto.SPAN_KIND_CONSUMER
    assert process.parent_id == published.span_id
    assert process.attributes["conveyor.job.id"] == job_id
    assert process.attributes["conveyor.job.attempt"] == 1
    claim = one(spans, "the claim", name="claim")
    handler = one(spans, "the handler", name="handler demo.sleep")
    record = one(spans, "the outcome's record", name="record")
    for span in (claim, handler, record):
        assert span.service == "conveyor-worker"
        assert span.parent_id == process.span_id, span.name
    assert handler.attributes["conveyor.attempt.ending"] == "returned"

    # Every event is published under the span that caused it, and delivered under its publish.
    event_publishes = [span for span in spans if span.name == events]
    parents = sorted(by_id[span.parent_id].name for span in event_publishes)
    assert parents == sorted(["POST /v1/jobs", "claim", *["handler demo.sleep"] * reports, "record"])
    deliveries = [span for span in spans if span.service == "conveyor-progress"]
    assert {span.name for span in deliveries} == {f"deliver {events_topic(prefix)}"}
    assert all(span.kind == SpanProto.SPAN_KIND_CONSUMER for span in deliveries)
    assert sorted(by_id[span.parent_id].name for span in deliveries) == [events] * event_count
    terminal_publish = one(event_publishes, "the succeeded event's publish", parent_id=record.span_id)
    [terminal] = [span for span in deliveries if span.parent_id == terminal_publish.span_id]
    assert terminal.attributes["conveyor.job.id"] == job_id
    assert terminal.attributes["conveyor.listeners"] == 1

    # The worker's log lines of the job name its trace and span.
    started = [
        line for line in stack.log("worker-1").splitlines() if "job.started" in line and job_id in line
    ]
    assert started, stack.log("worker-1")[-3000:]
    assert f"trace_id={submission.trace_id}" in started[0]
    assert f"span_id={process.span_id}" in started[0]

    # A client's own `traceparent` is continued: its job's spans are in the client's trace.
    async with stack.client() as client:
        response = await client.post(
            "/v1/jobs", json=sleep_job(0, steps=1), headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 202, response.text
        await wait_for_status(client, response.json()["id"], "succeeded", 60)
    client_trace, client_span = TRACEPARENT.split("-")[1:3]

    def client_job() -> list[ReceivedSpan] | None:
        spans = receiver.in_trace(client_trace)
        return spans if any(span.name == "record" for span in spans) else None

    spans = await eventually(client_job, 30, "the job's spans in the client's trace")
    assert one(spans, "the submission", name="POST /v1/jobs").parent_id == client_span
    # A delayed job and a retried one: the scheduler that queues them makes no traced call, so their job
    # messages continue the job's own trace (its submission's), and the next attempt joins it.
    async with stack.client() as client:
        delayed = await submit(client, {**sleep_job(0, steps=1), "delay_s": 1})
        retried = await submit(client, {"type": "demo.fail", "payload": {"fail_times": 1}})
        for job in (delayed, retried):
            await wait_for_status(client, job["id"], "succeeded", 60)

    def attempts_of(job: dict[str, Any], count: int) -> list[ReceivedSpan] | None:
        processes = [span for span in receiver.spans if span.attributes.get("conveyor.job.id") == job["id"]]
        processes = [span for span in processes if span.name == f"process {job_topic}"]
        return (
            sorted(processes, key=lambda span: span.attributes["conveyor.job.attempt"])
            if len(processes) == count
            else None
        )

    [process] = await eventually(lambda: attempts_of(delayed, 1), 30, "the delayed job's processing")
    trace = await eventually(lambda: receiver.in_trace(process.trace_id), 30, "the delayed job's trace")
    by_id = {span.span_id: span for span in trace}
    queued_by = by_id[process.parent_id]
    assert (queued_by.name, queued_by.service) == (f"publish {job_topic}", "conveyor-worker")
    assert by_id[queued_by.parent_id].name == "POST /v1/jobs"

    first, second = await eventually(lambda: attempts_of(retried, 2), 30, "the retried job's two attempts")
    assert first.trace_id == second.trace_id
    trace = await eventually(lambda: receiver.in_trace(first.trace_id), 30, "the retried job's trace")
    by_id = {span.span_id: span for span in trace}
    handlers = [span for span in trace if span.name == "handler demo.fail"]
    assert sorted(by_id[span.parent_id].attributes["conveyor.job.attempt"] for span in handlers) == [1, 2]
    assert by_id[by_id[second.parent_id].parent_id].name == "POST /v1/jobs"

    # Probes are not traced.
    assert not [span for span in receiver.spans if "healthz" in span.name or "readyz" in span.name]


async def test_a_relay_that_does_not_trace_passes_the_trace_context_on(
    db: Database, kafka_bootstrap: str
) -> None:
    """This test's process does not trace: a row staged with a carrier goes out with its headers as
    they are, so a trace survives a process that exports nothing."""
    assert not tracing.enabled()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    await ensure_topics(kafka_bootstrap, prefix, partitions=1, replication_factor=1)
    topic = events_topic(prefix)
    carrier = json.dumps({"traceparent": TRACEPARENT})
    rows = await db.write(
        lambda connection: stage_messages(connection, [(topic, "job-1", b"{}", None, carrier)])
    )
    relay = OutboxRelay(db, kafka_bootstrap)
    await relay.start()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id=None
    )
    try:
        assert await relay.publish(rows)
        await consumer.start()
        record = await consumer.getone()
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
        await relay.stop()
    assert record.headers == (("traceparent", TRACEPARENT.encode()),)
    assert tracing.carrier_from_headers(record.headers) == carrier.replace(" ", "")


async def test_changes_carry_their_caller_s_trace_context(db: Database) -> None:
    """A unit's trace context goes with every message its changes stage, and a new job keeps it; a
    change made without one (the scheduler, the reaper, the sweep) continues the job's own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    carrier = json.dumps({"traceparent": TRACEPARENT})
    job = NewJob(tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1)
    units = [Unit((job,), trace=carrier)]
    written = await db.write(functools.partial(write_changes, units=units, prefix=prefix))
    [[created]] = written.results
    assert created.job is not None and created.job.trace_context == carrier
    assert [row.headers for row in written.outbox] == [carrier, carrier]  # its event and its job message
    # A claim carries its own (each job a worker claims at once is in its own trace).
    claim_carrier = json.dumps({"traceparent": TRACEPARENT.replace("b7ad6b7169203331", "00f067aa0ba902b7")})
    claim = await write_now(db, prefix, changes.claim(job.id, "w-1", 15, trace=claim_carrier))
    [[claimed]] = claim.results
    assert claimed.job is not None
    assert [row.headers for row in claim.outbox] == [claim_carrier]
    failed = await write_now(db, prefix, changes.fail_attempt(claimed.job, {"type": "boom"}))
    # The event and the dead letter of a change made in no span: the job's trace.
    assert [row.headers for row in failed.outbox] == [carrier, carrier]
    untraced = await write_now(db, prefix, replace(job, id=changes.new_job_id()))
    assert [row.headers for row in untraced.outbox] == [None, None]


def test_tracing_is_off_unless_an_endpoint_is_set() -> None:
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}
    )
    # Off, nothing is carried: no context for a change to stage, no headers for a message.
    assert tracing.current_carrier() is None
    assert tracing.headers_of(None) is None
