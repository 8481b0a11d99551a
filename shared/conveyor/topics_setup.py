"""Creates the project's topics at a service's start, and keeps trying while Kafka is away."""

from __future__ import annotations

import asyncio

import structlog

from conveyor.background import BackgroundTask, retry_every
from conveyor.broker import BrokerUnavailable, ensure_topics
from conveyor.settings import Settings
from conveyor.sizes import topic_max_message_bytes

log = structlog.get_logger(__name__)

RETRY_INTERVAL_S = 2.0


async def ensure_deployment_topics(settings: Settings, bootstrap: str | None = None) -> list[str]:
    """Create the deployment's missing topics as its settings describe them (partitions, replication,
    message limit), on `bootstrap` or the configured brokers; the ones created."""
    return await ensure_topics(
        bootstrap or settings.kafka_bootstrap,
        settings.topic_prefix,
        settings.partitions,
        settings.replication_factor,
        settings.events_partitions,
        topic_max_message_bytes(settings),
    )


class TopicKeeper:
    """`start()` tries once; if Kafka is unreachable, a background task retries until it succeeds."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._retry = BackgroundTask("topic-keeper", lambda: retry_every(RETRY_INTERVAL_S, self._try_once))
        self.ready = asyncio.Event()

    async def start(self) -> None:
        if not await self._try_once():
            self._retry.start()

    async def stop(self) -> None:
        await self._retry.stop()

    async def _try_once(self) -> bool:
        s = self._settings
        try:
            created = await ensure_deployment_topics(s)
        except BrokerUnavailable as exc:
            log.warning("topics.unavailable", error=str(exc))
            return False
        if created:
            log.info("topics.created", topics=created)
        self.ready.set()
        return True
