"""The progress service: live job events over WebSockets and Server-Sent Events, fed by the events
topic, with gaps and resumes served from the job's history in the database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from conveyor import collector, metrics
from conveyor.auth import Authenticator, parse_bootstrap_keys
from conveyor.background import BackgroundTask, run_every
from conveyor.database import Database
from conveyor.health import health_router
from conveyor.httpmetrics import HttpMetrics, metrics_router
from conveyor.problems import install_problem_handlers
from conveyor.pruning import Pruner, keep_for, prune_event_history
from conveyor.request_spans import http_telemetry
from conveyor.settings import Settings
from conveyor.sizes import topic_max_message_bytes
from conveyor.topics_setup import TopicKeeper
from services.progress import sse
from services.progress.cors import allow_the_dashboard
from services.progress.hub import EventHub
from services.progress.socket_routes import SocketRoutes
from services.progress.state import ProgressState, progress_state


def create_app(settings: Settings) -> SocketRoutes:
    """The HTTP app, with its WebSocket endpoints in front of it (`socket_routes`)."""
    metrics.configure(settings.metrics_tenant_label)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        await db.migrate()
        topics = TopicKeeper(settings)
        await topics.start()
        await topics.ready.wait()
        hub = EventHub(settings.kafka_bootstrap, settings.topic_prefix, topic_max_message_bytes(settings))
        await hub.start()
        pruner = Pruner(db, "event-history", keep_for(prune_event_history, settings.event_history_s))
        await pruner.start()
        authenticator = Authenticator(db, parse_bootstrap_keys(settings.api_keys))
        app.state.progress = ProgressState(settings, db, hub, authenticator)
        tallies = BackgroundTask(
            "metrics-tallies",
            lambda: run_every(metrics.TALLY_FLUSH_S, _flush_tallies, failure_event="metrics.flush_failed"),
        )
        tallies.start()
        collector.started(old_threshold=collector.GROWING_HEAP_OLD_THRESHOLD)
        try:
            yield
        finally:
            await tallies.stop()
            metrics.flush_tallies()  # what the last interval tallied
            await pruner.stop()
            await hub.stop()
            await topics.stop()
            await db.close()

    app = FastAPI(title="Conveyor progress", version="0.1.0", lifespan=lifespan, telemetry=http_telemetry())
    install_problem_handlers(app)
    app.add_middleware(HttpMetrics)
    # Outermost: a preflight is answered before anything else looks at it.
    allow_the_dashboard(app, settings)

    @app.get("/v1/jobs/{job_id}/events", response_model=None)
    async def job_events_http(
        request: Request,
        job_id: str,
        after_seq: int | None = Query(default=None, ge=0, description="Only events after this seq."),
        limit: int = Query(
            default=sse.MAX_PAGE, ge=1, le=sse.MAX_PAGE, description="Events per page (JSON)."
        ),
    ) -> Response:
        """Server-Sent Events with `Accept: text/event-stream` (resume with `Last-Event-ID`); else the
        job's recorded events as JSON."""
        return await sse.job_events(request, job_id, after_seq, limit)

    app.include_router(health_router(progress_state))
    app.include_router(metrics_router(settings.metrics_token))
    return SocketRoutes(app)


async def _flush_tallies() -> None:
    metrics.flush_tallies()
