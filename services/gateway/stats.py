"""`GET /v1/stats`: the caller's tenant's queue (what `conveyor top` draws), in one grouped query."""

from __future__ import annotations

import functools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from conveyor.jobstats import queue_stats
from conveyor.jsoncodec import FastJSONResponse
from conveyor.models import utcnow
from conveyor.schemas import QueueStatsResource
from services.gateway.jobs import problems
from services.gateway.security import require_principal
from services.gateway.state import gateway_state

router = APIRouter(prefix="/v1")


@router.get("/stats", response_model=QueueStatsResource, responses=problems())
async def read_stats(request: Request) -> JSONResponse:
    """The tenant's scheduled, queued and running jobs per priority, its jobs finished in the last
    minute by outcome, and since when its oldest queued job has waited. Needs the `read` scope."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    stats = await state.db.read(functools.partial(queue_stats, tenant=principal.tenant, now=utcnow()))
    return FastJSONResponse(stats.document())
