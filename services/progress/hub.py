"""The event hub: one consumer of the whole events topic per instance, fanning events out to subscribers.

It reads with no consumer group, so every progress instance sees every event. It is positioned at
the end of the topic before it serves anyone: a subscriber registers with the hub first and reads
the job's snapshot second, so any event newer than the snapshot is sure to reach it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from conveyor.broker import start_events_consumer
from conveyor.events import JobEvent

log = structlog.get_logger(__name__)

# Each subscriber's own queue: a slow client fills its queue, never the hub's.
SUBSCRIBER_QUEUE_SIZE = 1000
POLL_TIMEOUT_MS = 200


class Subscription:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.queue: asyncio.Queue[JobEvent] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)
        self.overflowed = asyncio.Event()

    def offer(self, event: JobEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()


class EventHub:
    def __init__(self, bootstrap: str, prefix: str) -> None:
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._consumer: AIOKafkaConsumer | None = None
        self._subscriptions: dict[str, set[Subscription]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = await start_events_consumer(self._bootstrap, self._prefix)
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(job_id)
        self._subscriptions[job_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscriptions.get(subscription.job_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscriptions[subscription.job_id]

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except KafkaError as exc:
                log.warning("hub.fetch_failed", error=str(exc))
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    self._dispatch(record.key, record.value)

    def _dispatch(self, key: bytes | None, value: bytes) -> None:
        job_id = key.decode() if key else None
        if job_id not in self._subscriptions:
            return  # nobody watches this job: skip parsing
        try:
            event = JobEvent.model_validate_json(value)
        except ValidationError:
            log.error("hub.bad_event", job_id=job_id)
            return
        for subscription in self._subscriptions.get(event.job_id, ()):
            subscription.offer(event)
