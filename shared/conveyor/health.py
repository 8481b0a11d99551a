"""Liveness and readiness, shared by the gateway and the progress service."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from conveyor.database import Database
from conveyor.readiness import check_readiness
from conveyor.settings import Settings


def health_router(dependencies: Callable[[Request], tuple[Database, Settings]]) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """200 once the database and Kafka answer and the topics exist; 503 otherwise."""
        db, settings = dependencies(request)
        checks = await check_readiness(db, settings.kafka_bootstrap, settings.topic_prefix)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
        )

    return router
