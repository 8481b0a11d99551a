"""The event hub: one reader of the whole events topic per instance, handing each event to the
channels that watch its job or its tenant.

It reads with no consumer group, so every progress instance sees every event, and starts at the end
of the topic: what happened before a client watched comes from the database (`conveyor.eventlog`),
not from Kafka. A channel watches first and reads its snapshot second, so an event newer than the
snapshot is certain to reach it; older ones are dropped by their `seq`.

A listener belongs to one tenant and is offered only that tenant's events, whatever it watches: a
job id is watched before the database says whose job it is, and that read may come back "not
yours" after the job's events have arrived. So the watchers of a job are kept by tenant (a
`fanout.Fanout` each), and an event goes to those of its own tenant: no test per listener, and no way
to reach another's. Of those, the ones that keep up ride the fan-out: the event is written to their
sockets in one loop. The others are offered it, each through its own channel.

With tracing on, handing a watched event to its listeners is a `deliver <topic>` span (a consumer
span) in the trace its message's headers carry: the worker's, or the gateway's. The writes to the
sockets are not spans of their own, since a span per event and client would cost more than the write.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from conveyor import tracing
from conveyor.background import BackgroundTask
from conveyor.broker import start_events_consumer, stop_consumer
from conveyor.events import JobEvent
from conveyor.sizes import DEFAULT_TOPIC_MAX_MESSAGE_BYTES
from services.progress.fanout import Fanout, Listener

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200
FETCH_RETRY_S = 1.0
# Work that can wait (ending and closing the sockets of jobs that are done) waits until the hub has
# handed out no event for QUIET_S, so that a burst of events is out first, but never longer than
# QUIET_MAX_WAIT_S; then it runs QUIET_CALLBACKS_PER_TURN at a time, the loop's I/O in between. When
# 10,000 subscribers of 20 jobs that finish together get their terminal events, waking and closing
# each socket (~150 µs) would otherwise come between the hub and its next events: 700 ms in
# `bench/progress_fanout.py --subscribers 10000`.
QUIET_S = 0.02
QUIET_MAX_WAIT_S = 1.0
QUIET_CALLBACKS_PER_TURN = 32


class EventHub:
    def __init__(
        self, bootstrap: str, prefix: str, max_message_bytes: int = DEFAULT_TOPIC_MAX_MESSAGE_BYTES
    ) -> None:
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._max_message_bytes = max_message_bytes
        self._consumer: AIOKafkaConsumer | None = None
        # Job id -> tenant -> its watchers: an event goes to its own tenant's watchers only.
        self._by_job: dict[str, dict[str, Fanout]] = {}
        self._by_tenant: dict[str, set[Listener]] = defaultdict(set)
        self._reader = BackgroundTask("event-hub", self._run)
        # The loop's time when the hub last handed events to listeners.
        self._handed_out_at = 0.0
        # What waits for a quiet spell (`when_quiet`): when each was asked for, and the callback.
        self._when_quiet: deque[tuple[float, Callable[[], None]]] = deque()
        self._when_quiet_timer: asyncio.TimerHandle | asyncio.Handle | None = None

    async def start(self) -> None:
        self._consumer = await start_events_consumer(self._bootstrap, self._prefix, self._max_message_bytes)
        self._reader.start()

    async def stop(self) -> None:
        await self._reader.stop()
        if self._consumer is not None and not await stop_consumer(self._consumer):
            log.warning("hub.consumer_stop_unclean")

    def watch_job(self, job_id: str, listener: Listener) -> None:
        tenants = self._by_job.setdefault(job_id, {})
        fanout = tenants.get(listener.tenant)
        if fanout is None:
            fanout = tenants[listener.tenant] = Fanout(job_id, self.when_quiet)
        fanout.add(listener)

    def unwatch_job(self, job_id: str, listener: Listener) -> None:
        tenants = self._by_job.get(job_id)
        fanout = tenants.get(listener.tenant) if tenants is not None else None
        if tenants is None or fanout is None:
            return
        fanout.discard(listener)
        if not fanout:
            del tenants[listener.tenant]
            if not tenants:
                del self._by_job[job_id]

    def ride(self, job_id: str, listener: Listener, seq: int) -> None:
        """The listener watches the job, was sent its events up to `seq`, and waits on an empty
        queue: it may ride the job's fan-out from here (`Fanout.join`)."""
        tenants = self._by_job.get(job_id)
        fanout = tenants.get(listener.tenant) if tenants is not None else None
        if fanout is not None:
            fanout.join(listener, seq)

    def watch_tenant(self, tenant: str, listener: Listener) -> None:
        self._by_tenant[tenant].add(listener)

    def unwatch_tenant(self, tenant: str, listener: Listener) -> None:
        _discard(self._by_tenant, tenant, listener)

    def when_quiet(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the hub has handed out no event for QUIET_S (or QUIET_MAX_WAIT_S from
        now), in the order asked, QUIET_CALLBACKS_PER_TURN per turn of the loop."""
        loop = asyncio.get_running_loop()
        self._when_quiet.append((loop.time(), callback))
        if self._when_quiet_timer is None:
            self._when_quiet_timer = loop.call_soon(self._call_when_quiet)

    async def quiet(self) -> None:
        """Return once the hub is quiet (`when_quiet`)."""
        done = asyncio.get_running_loop().create_future()
        self.when_quiet(functools.partial(_resolve, done))
        await done

    def _call_when_quiet(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A quiet spell is the absence of events, which no event can signal: it is timed.
        busy_s = self._handed_out_at + QUIET_S - now
        waited_s = now - self._when_quiet[0][0]
        if busy_s > 0 and waited_s < QUIET_MAX_WAIT_S:
            wait_s = min(busy_s, QUIET_MAX_WAIT_S - waited_s)
            self._when_quiet_timer = loop.call_later(wait_s, self._call_when_quiet)
            return
        for _ in range(min(QUIET_CALLBACKS_PER_TURN, len(self._when_quiet))):
            self._when_quiet.popleft()[1]()
        self._when_quiet_timer = loop.call_soon(self._call_when_quiet) if self._when_quiet else None

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("hub.fetch_failed", error=str(exc))
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            self.dispatch_fetched(batches)

    def dispatch_fetched(
        self, batches: Mapping[TopicPartition, Sequence[ConsumerRecord[bytes, bytes]]]
    ) -> None:
        """Hand one fetch's events to their listeners."""
        if not batches:
            return
        if tracing.enabled():  # a span per event
            for tp, records in batches.items():
                for record in records:
                    self.dispatch(record.key, record.value, record.headers, tp.topic)
        else:
            # A job's events that came in one fetch go to each listener together: when a burst keeps
            # the hub busy, a job's last progress report and its terminal event often do, and a
            # socket then gets both in one write.
            by_job: dict[str, list[bytes]] = {}
            for records in batches.values():
                for record in records:
                    job_id = record.key.decode() if record.key else ""
                    if job_id in self._by_job or self._by_tenant:
                        by_job.setdefault(job_id, []).append(record.value)
            for job_id, values in by_job.items():
                if len(values) == 1:
                    self._deliver(job_id, values[0])
                else:
                    self._deliver_all(job_id, values)
        self._handed_out_at = asyncio.get_running_loop().time()

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
        """Parse the event and hand it to the listeners watching its job or tenant; how many took it."""
        event = _parsed(job_id, value)
        return 0 if event is None else self._hand_out((event,))

    def _deliver_all(self, job_id: str, values: Sequence[bytes]) -> None:
        """Several events of one job, in the order they came: to each listener together if their
        seqs follow on (else one by one, for each listener to sort out)."""
        events = [event for value in values if (event := _parsed(job_id, value)) is not None]
        if not all(later.seq == earlier.seq + 1 for earlier, later in itertools.pairwise(events)):
            for event in events:
                self._hand_out((event,))
        elif events:
            self._hand_out(events)

    def _hand_out(self, events: Sequence[JobEvent]) -> int:
        """A job's events, consecutive seqs: written to the riders of its fan-out, then offered to
        the other listeners of its tenant watching the job or the whole tenant. How many took them."""
        first = events[0]
        tenants = self._by_job.get(first.job_id)
        fanout = tenants.get(first.tenant) if tenants is not None else None
        written = fanout.write(events) if fanout is not None else 0
        listeners = self._offered(fanout, first.tenant)
        if len(events) == 1:
            for listener in listeners:
                listener.offer(first)
        else:
            for listener in listeners:
                listener.offer_all(events)
        if fanout is not None:
            fanout.take_riders(events[-1])
        return written + len(listeners)

    def _offered(self, fanout: Fanout | None, tenant: str) -> list[Listener]:
        """The tenant's listeners to offer an event to: those of the job's fan-out that do not ride
        it, and those watching the whole tenant (a copy: offering an event may end a subscription)."""
        by_job = fanout.offered if fanout is not None else None
        by_tenant = self._by_tenant.get(tenant)
        if by_tenant is None:
            return list(by_job) if by_job else []
        return list(by_tenant if by_job is None else by_job | by_tenant)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # its waiter may have been cancelled meanwhile
        future.set_result(None)


def _parsed(job_id: str, value: bytes) -> JobEvent | None:
    try:
        return JobEvent.from_json(value)
    except ValidationError:
        log.error("hub.bad_event", job_id=job_id)
        return None


def _discard(index: dict[str, set[Listener]], name: str, listener: Listener) -> None:
    listeners = index.get(name)
    if listeners is not None:
        listeners.discard(listener)
        if not listeners:
            del index[name]
