"""The event hub: one reader of the whole events topic per instance, handing each event to the
channels that watch its job or its tenant.

It reads with no consumer group, so every progress instance sees every event, and starts at the end
of the topic: what happened before a client watched comes from the database (`conveyor.eventlog`),
not from Kafka. A channel watches first and reads its snapshot second, so an event newer than the
snapshot is certain to reach it; older ones are dropped by their `seq`.

A listener belongs to one tenant and is offered only that tenant's events, whatever it watches: a
job id is watched before the database says whose job it is, and that read may come back "not
yours" after the job's events have arrived. The check is one string comparison per listener.

With tracing on, handing a watched event to its listeners is a `deliver <topic>` span (a consumer
span) in the trace its message's headers carry: the worker's, or the gateway's. Each connection then
writes the event to its socket from its own queue; that write is not a span of its own, since a span
per event and client would cost more than the write.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Protocol

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from conveyor import tracing
from conveyor.background import BackgroundTask
from conveyor.broker import start_events_consumer, stop_consumer
from conveyor.events import JobEvent
from conveyor.sizes import DEFAULT_TOPIC_MAX_MESSAGE_BYTES

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200
FETCH_RETRY_S = 1.0


class Listener(Protocol):
    @property
    def tenant(self) -> str:
        """The tenant whose events, and only whose, this listener may be offered."""

    def offer(self, event: JobEvent) -> None:
        """Take an event without blocking: the hub never waits for one client."""


class EventHub:
    def __init__(
        self, bootstrap: str, prefix: str, max_message_bytes: int = DEFAULT_TOPIC_MAX_MESSAGE_BYTES
    ) -> None:
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._max_message_bytes = max_message_bytes
        self._consumer: AIOKafkaConsumer | None = None
        self._by_job: dict[str, set[Listener]] = defaultdict(set)
        self._by_tenant: dict[str, set[Listener]] = defaultdict(set)
        self._reader = BackgroundTask("event-hub", self._run)

    async def start(self) -> None:
        self._consumer = await start_events_consumer(self._bootstrap, self._prefix, self._max_message_bytes)
        self._reader.start()

    async def stop(self) -> None:
        await self._reader.stop()
        if self._consumer is not None and not await stop_consumer(self._consumer):
            log.warning("hub.consumer_stop_unclean")

    def watch_job(self, job_id: str, listener: Listener) -> None:
        self._by_job[job_id].add(listener)

    def unwatch_job(self, job_id: str, listener: Listener) -> None:
        _discard(self._by_job, job_id, listener)

    def watch_tenant(self, tenant: str, listener: Listener) -> None:
        self._by_tenant[tenant].add(listener)

    def unwatch_tenant(self, tenant: str, listener: Listener) -> None:
        _discard(self._by_tenant, tenant, listener)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("hub.fetch_failed", error=str(exc))
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            for tp, records in batches.items():
                for record in records:
                    self.dispatch(record.key, record.value, record.headers, tp.topic)

    def dispatch(
        self,
        key: bytes | None,
        value: bytes,
        headers: tracing.Headers | None = None,
        topic: str = "",
    ) -> None:
        job_id = key.decode() if key else ""
        if job_id not in self._by_job and not self._by_tenant:
            return  # nobody watches this job: skip parsing
        if not tracing.enabled():
            self._deliver(job_id, value)
            return
        span = tracing.start_child(
            f"deliver {topic}",
            tracing.carrier_from_headers(headers),
            SpanKind.CONSUMER,
            {"messaging.system": "kafka", "messaging.destination.name": topic, "conveyor.job.id": job_id},
        )
        with trace.use_span(span, end_on_exit=True):
            span.set_attribute("conveyor.listeners", self._deliver(job_id, value))

    def _deliver(self, job_id: str, value: bytes) -> int:
        """Parse the event and offer it to the listeners watching its job or tenant; how many took it."""
        try:
            event = JobEvent.from_json(value)
        except ValidationError:
            log.error("hub.bad_event", job_id=job_id)
            return 0
        listeners = self._by_job.get(event.job_id, set()) | self._by_tenant.get(event.tenant, set())
        offered = 0
        for listener in listeners:
            if listener.tenant == event.tenant:
                listener.offer(event)
                offered += 1
        return offered


def _discard(index: dict[str, set[Listener]], name: str, listener: Listener) -> None:
    listeners = index.get(name)
    if listeners is not None:
        listeners.discard(listener)
        if not listeners:
            del index[name]
