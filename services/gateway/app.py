"""The gateway: FastAPI app that validates, authorizes, records and queues jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from conveyor import collector, metrics
from conveyor.auth import Authenticator, parse_bootstrap_keys
from conveyor.backlog import BacklogGauges
from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.handlers import load_handler_modules
from conveyor.health import health_router
from conveyor.httpmetrics import HttpMetrics, metrics_router
from conveyor.outbox import OutboxRelay
from conveyor.problems import install_problem_handlers
from conveyor.pruning import Pruner, keep_for, prune_finished_jobs, prune_keys
from conveyor.request_spans import http_telemetry
from conveyor.settings import Settings
from conveyor.sizes import max_message_bytes, max_submission_bytes
from conveyor.topics_setup import TopicKeeper
from services.gateway import jobs, stats
from services.gateway.bodylimit import BodyLimit
from services.gateway.dashboard import install_dashboard
from services.gateway.state import GatewayState, gateway_state
from services.gateway.waiting import StateNotifier, Waits


def create_app(settings: Settings) -> FastAPI:
    metrics.configure(settings.metrics_tenant_label)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        await db.migrate()
        relay = OutboxRelay(db, settings.kafka_bootstrap, max_message_bytes(settings))
        # Kafka may be down at start: the gateway still accepts jobs, and the relay publishes later.
        topics = TopicKeeper(settings)
        await topics.start()
        await relay.start()
        committer = Committer(db, relay, settings.topic_prefix)
        await committer.start()
        pruners = [
            Pruner(db, "idempotency-keys", prune_keys),
            Pruner(db, "finished-jobs", keep_for(prune_finished_jobs, settings.job_retention_s)),
        ]
        for pruner in pruners:
            await pruner.start()
        # The consumer lag and the outbox gauges, for the whole deployment (see conveyor.backlog).
        gauges = BacklogGauges(db, settings.kafka_bootstrap, settings.topic_prefix)
        await gauges.start()
        state = GatewayState(
            settings=settings,
            db=db,
            registry=load_handler_modules(settings.handler_modules),
            committer=committer,
            authenticator=Authenticator(db, parse_bootstrap_keys(settings.api_keys)),
            waits=Waits(db, StateNotifier(settings.kafka_bootstrap, settings.topic_prefix)),
        )
        app.state.gateway = state
        collector.started()
        try:
            yield
        finally:
            await state.waits.stop()
            await gauges.stop()
            for pruner in pruners:
                await pruner.stop()
            await committer.stop()
            await relay.stop()
            await topics.stop()
            await db.close()

    app = FastAPI(
        title="Conveyor gateway",
        version="0.1.0",
        description="Submit long-running jobs (202 Accepted) and follow them to their result.",
        lifespan=lifespan,
        telemetry=http_telemetry(),
    )
    install_problem_handlers(app)
    # Outermost but for Starlette's error handler: bodies are limited before routing, auth or parsing.
    app.add_middleware(BodyLimit, default=max_submission_bytes(settings))
    # Outside the body limit, so its 413s are counted too.
    app.add_middleware(HttpMetrics)
    app.include_router(jobs.router)
    app.include_router(stats.router)
    app.include_router(metrics_router(settings.metrics_token))

    app.include_router(health_router(gateway_state))
    # Last: its files are a mount, matched after every route.
    install_dashboard(app, settings)
    return app
