"""The progress service: live job events over WebSockets, fed by the events topic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, WebSocket

from conveyor.auth import Principal, authenticate, bearer_token, parse_bootstrap_keys
from conveyor.database import Database
from conveyor.health import health_router
from conveyor.settings import Settings
from conveyor.topics_setup import TopicKeeper
from services.progress.hub import EventHub
from services.progress.streams import CLOSE_POLICY_VIOLATION, stream_job_events


@dataclass
class ProgressState:
    settings: Settings
    db: Database
    hub: EventHub
    bootstrap_keys: dict[str, Principal]


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        await db.migrate()
        topics = TopicKeeper(settings)
        await topics.start()
        await topics.ready.wait()
        hub = EventHub(settings.kafka_bootstrap, settings.topic_prefix)
        await hub.start()
        app.state.progress = ProgressState(settings, db, hub, parse_bootstrap_keys(settings.api_keys))
        try:
            yield
        finally:
            await hub.stop()
            await topics.stop()
            await db.close()

    app = FastAPI(title="Conveyor progress", version="0.1.0", lifespan=lifespan)

    @app.websocket("/v1/jobs/{job_id}/events")
    async def job_events(websocket: WebSocket, job_id: str) -> None:
        """A snapshot of the job, then each state change and progress report, then the terminal event."""
        state: ProgressState = websocket.app.state.progress
        await websocket.accept()
        principal = await _authenticate(websocket, state)
        if principal is None or "read" not in principal.scopes:
            await websocket.close(CLOSE_POLICY_VIOLATION, "unauthorized")
            return
        await stream_job_events(
            websocket,
            db=state.db,
            hub=state.hub,
            principal=principal,
            job_id=job_id,
            events_url=settings.progress_url,
        )

    def dependencies(request: Request) -> tuple[Database, Settings]:
        state: ProgressState = request.app.state.progress
        return state.db, state.settings

    app.include_router(health_router(dependencies))
    return app


async def _authenticate(websocket: WebSocket, state: ProgressState) -> Principal | None:
    # Browsers cannot set headers on a WebSocket: they may pass the key as `?token=`.
    token = bearer_token(websocket.headers.get("authorization")) or websocket.query_params.get("token")
    if not token:
        return None
    async with state.db.reading() as session:
        return await authenticate(session, state.bootstrap_keys, token)
