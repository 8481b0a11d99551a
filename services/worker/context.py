"""What every part of a worker shares, built once per worker process."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.handlers import Registry
from conveyor.outbox import OutboxRelay
from conveyor.settings import Settings
from conveyor.sizes import max_message_bytes


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    db: Database
    relay: OutboxRelay
    # The one write path of the process: claims, outcomes and progress, in group commits.
    committer: Committer
    registry: Registry
    worker_id: str

    @classmethod
    def build(cls, settings: Settings, registry: Registry) -> WorkerContext:
        db = Database(settings.resolved_database_url)
        relay = OutboxRelay(db, settings.kafka_bootstrap, max_message_bytes(settings))
        committer = Committer(db, relay, settings.topic_prefix)
        return cls(settings, db, relay, committer, registry, new_worker_id())
