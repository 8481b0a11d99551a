"""Cross-origin reads for the dashboard. The gateway serves the page, on another origin than this
service, and the page reads a job's JSON history here (`GET /v1/jobs/<id>/events`) with its key in
`Authorization`, which makes the browser ask first (a CORS preflight). Only the gateway's origin is
answered, only for GETs, and without credentials: the key is a header the page sets, never a cookie
the browser would add on its own. WebSockets are not concerned (browsers do not apply CORS to them;
a socket is admitted by its key, whatever its `Origin`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from conveyor.settings import Settings

# How long a browser may reuse a preflight's answer.
PREFLIGHT_MAX_AGE_S = 600


def dashboard_origin(settings: Settings) -> str:
    """The origin the dashboard is served from: the gateway's public URL's scheme, host and port."""
    url = urlsplit(settings.gateway_url)
    return f"{url.scheme}://{url.netloc}"


def allow_the_dashboard(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[dashboard_origin(settings)],
        allow_methods=["GET"],
        allow_headers=["Authorization", "Accept"],
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_S,
    )
