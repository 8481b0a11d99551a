"""What the gateway's request handlers share: settings, database, registry, relay, bootstrap keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from conveyor.auth import Principal
from conveyor.database import Database
from conveyor.handlers import Registry
from conveyor.outbox import OutboxRelay
from conveyor.settings import Settings
from services.gateway.limits import SubmissionLimiter


@dataclass
class GatewayState:
    settings: Settings
    db: Database
    registry: Registry
    relay: OutboxRelay
    bootstrap_keys: dict[str, Principal]
    limiter: SubmissionLimiter = field(default_factory=SubmissionLimiter)


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state
