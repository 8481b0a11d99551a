"""What the gateway's request handlers share: settings, database, registry, committer, authenticator,
the requests waiting on jobs (`?wait=`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from conveyor.auth import Authenticator
from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.handlers import Registry
from conveyor.settings import Settings
from services.gateway.limits import SubmissionLimiter
from services.gateway.waiting import Waits


@dataclass
class GatewayState:
    settings: Settings
    db: Database
    registry: Registry
    committer: Committer
    authenticator: Authenticator
    waits: Waits
    limiter: SubmissionLimiter = field(default_factory=SubmissionLimiter)


def gateway_state(request: Request) -> GatewayState:
    """The gateway's state. Handlers call this (and `security.require_principal`) themselves rather
    than declare them as FastAPI dependencies: resolving dependencies costs more per request than the
    rest of a submission, and FastAPI runs a plain function dependency on a worker thread."""
    state: GatewayState = request.app.state.gateway
    return state
