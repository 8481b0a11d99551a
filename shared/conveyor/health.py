"""Liveness and readiness, shared by the gateway and the progress service."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from conveyor.auth import Authenticator, bearer_token
from conveyor.database import Database
from conveyor.memo import Remembered
from conveyor.readiness import check_readiness
from conveyor.settings import Settings

log = structlog.get_logger(__name__)

# How long a readiness answer is reused: probes and load balancers may ask many times a second, and a
# fresh answer costs a database round trip and a new Kafka admin connection.
READINESS_CACHE_S = 1.0


class ServiceState(Protocol):
    """What readiness needs of a service's state: its database and settings, and its authenticator
    (None: what is wrong is told to nobody over HTTP, only in the log)."""

    @property
    def db(self) -> Database: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def authenticator(self) -> Authenticator | None: ...


def health_router(service_state: Callable[[Request], ServiceState]) -> APIRouter:
    """`/healthz` and `/readyz`. Readiness says ready or not to anyone; what is wrong (a missing topic,
    an unreachable dependency) only to a caller with a valid key, and in the log."""
    router = APIRouter()
    readiness: list[Remembered[dict[str, str]]] = []  # made on the first request, which has the database

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """200 once the database and Kafka answer and the topics exist; 503 otherwise."""
        state = service_state(request)
        if not readiness:
            check = functools.partial(_checked, state.db, state.settings)
            readiness.append(Remembered(check, READINESS_CACHE_S))
        checks = await readiness[0].get()
        ready = all(value == "ok" for value in checks.values())
        body: dict[str, object] = {"status": "ready" if ready else "not ready"}
        authenticator = state.authenticator
        if authenticator is not None and await _authenticated(request, authenticator):
            body["checks"] = checks
        return JSONResponse(body, status_code=200 if ready else 503)

    return router


async def _checked(db: Database, settings: Settings) -> dict[str, str]:
    checks = await check_readiness(db, settings.kafka_bootstrap, settings.topic_prefix)
    if any(value != "ok" for value in checks.values()):
        log.warning("readiness.not_ready", checks=checks)
    return checks


async def _authenticated(request: Request, authenticator: Authenticator) -> bool:
    """Whether the request carries a valid key (any scope). Never an error: readiness must answer
    even when the database that holds the keys does not."""
    token = bearer_token(request.headers.get("authorization"))
    if not token:
        return False
    try:
        return await authenticator.principal(token) is not None
    except (SQLAlchemyError, OSError):
        return False
