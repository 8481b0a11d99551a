"""What the progress service's endpoints share: settings, database, hub and authenticator. It is the
one context the service's modules take (a connection's stream too), rather than each of its parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from conveyor.auth import Authenticator, bearer_token
from conveyor.database import Database
from conveyor.settings import Settings
from services.progress.admission import TenantSlots
from services.progress.hub import EventHub
from services.progress.snapshots import SnapshotReads


@dataclass
class ProgressState:
    settings: Settings
    db: Database
    hub: EventHub
    authenticator: Authenticator
    # The WebSockets and the SSE streams each tenant holds open on this instance.
    sockets: TenantSlots = field(init=False)
    streams: TenantSlots = field(init=False)
    # Snapshots and resumes read in batches: one transaction for every subscriber asking meanwhile.
    snapshots: SnapshotReads = field(init=False)

    def __post_init__(self) -> None:
        self.sockets = TenantSlots(self.settings.progress_tenant_max_sockets)
        self.streams = TenantSlots(self.settings.progress_tenant_max_streams)
        self.snapshots = SnapshotReads(self.db)


def progress_state(connection: HTTPConnection) -> ProgressState:
    """The progress service's state, made by its app's lifespan."""
    state: ProgressState = connection.app.state.progress
    return state


def presented_token(connection: HTTPConnection) -> str | None:
    """The API key from the `Authorization` header or, for browsers, which cannot set headers on a
    WebSocket or an EventSource, a `token` query parameter."""
    return bearer_token(connection.headers.get("authorization")) or connection.query_params.get("token")
