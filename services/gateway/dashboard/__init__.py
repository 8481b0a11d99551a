"""The dashboard (`/dashboard`): a live page for operators, served as static files from this package.

The page is plain ES modules (no build step, no CDN: it works offline and behind a firewall) that talk
to the public API with the key the user signs in with, and to the progress service: its `/v1/events`
WebSocket, and a job's JSON history (which it lets the gateway's origin read: `services.progress.cors`).
Its few reads of its own (who the key is, a job's payload, the finished-per-minute chart) are here,
authenticated like every API route and kept out of the OpenAPI schema, which the dashboard leaves
unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from conveyor.jobstore import get_job
from conveyor.jsoncodec import FastJSONResponse
from conveyor.models import utcnow
from conveyor.problems import job_not_found
from conveyor.settings import Settings
from conveyor.throughput import finished_per_minute
from services.gateway.security import require_principal
from services.gateway.state import gateway_state

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/dashboard"
HTTP_SCHEMES = {"ws": "http", "wss": "https"}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


@router.get("/config.json")
async def read_config(request: Request) -> JSONResponse:
    """Where the page finds the progress service: it runs on another port (or host) than the gateway.
    Public, like `links.events` on every job: it holds no secret and no tenant's data."""
    settings = gateway_state(request).settings
    return FastJSONResponse({"events_url": events_url(settings), "history_url": history_url(settings)})


@router.get("/me")
async def read_me(request: Request) -> JSONResponse:
    """The key's tenant and scopes, so the page offers only what the key may do (the API still checks)."""
    principal = await require_principal(request, gateway_state(request))
    return FastJSONResponse({"tenant": principal.tenant, "scopes": sorted(principal.scopes)})


@router.get("/jobs/{job_id}/payload")
async def read_payload(request: Request, job_id: str) -> JSONResponse:
    """The job's payload as stored (the job resource leaves it out). Needs the `read` scope."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    job = await state.db.read(functools.partial(get_job, tenant=principal.tenant, job_id=job_id))
    if job is None:
        raise job_not_found(f"no job {job_id!r}")
    return FastJSONResponse({"id": job.id, "payload": job.payload})


@router.get("/finished-per-minute")
async def read_finished_per_minute(request: Request) -> JSONResponse:
    """The tenant's finished jobs in each of the last 15 minutes, oldest first. Needs `read`."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    now = utcnow()
    counts = await state.db.read(functools.partial(finished_per_minute, tenant=principal.tenant, now=now))
    return FastJSONResponse({"at": now.isoformat().replace("+00:00", "Z"), "minutes": counts})


def events_url(settings: Settings) -> str:
    return f"{settings.progress_url}/v1/events"


def progress_http_url(settings: Settings) -> str:
    """The progress service's HTTP base (its public URL is the WebSockets' `ws://` or `wss://`)."""
    url = urlsplit(settings.progress_url)
    return url._replace(scheme=HTTP_SCHEMES.get(url.scheme, url.scheme)).geturl()


def history_url(settings: Settings) -> str:
    """Where a job's JSON history is: `<this>/<id>/events` (the progress service lets the page read it)."""
    return f"{progress_http_url(settings)}/v1/jobs"


def content_security_policy(settings: Settings) -> str:
    """Only the page's own files run, and it connects only to the gateway and the progress service."""
    sockets, history = urlsplit(settings.progress_url), urlsplit(progress_http_url(settings))
    return "; ".join(
        (
            "default-src 'self'",
            f"connect-src 'self' {sockets.scheme}://{sockets.netloc} {history.scheme}://{history.netloc}",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


class DashboardFiles(StaticFiles):
    """The page's files, with headers that keep the key the page holds to the page: no framing, no
    foreign scripts, no referrer."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(directory=STATIC_DIR, html=True)
        self._headers = {
            "Content-Security-Policy": content_security_policy(settings),
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            # Revalidated on every load, so a new release's modules never mix with an old one's.
            "Cache-Control": "no-cache",
        }

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(self._headers)
        return response


def install_dashboard(app: FastAPI, settings: Settings) -> None:
    """The dashboard's reads, then its files at `/dashboard/` (`/dashboard` redirects there)."""
    app.include_router(router)
    app.mount(PREFIX, DashboardFiles(settings), name="dashboard")
