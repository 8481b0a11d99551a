"""HTTP metrics and the `/metrics` endpoint of every service.

`HttpMetrics` is a pure ASGI middleware (no BaseHTTPMiddleware: it would cost a task and a copy of
every response): it counts each answered request by route template (`/v1/jobs/{job_id}`, never the
id itself, so the series stay few) and status, and times it. On the submission routes it also counts
a refusal by its reason (`conveyor_jobs_rejected_total`): the status says most of it, and a 429 says
which limit (the problem's `limit`, left in the request's scope by the problem handler).

`/metrics` answers with a bearer token of its own (`CONVEYOR_METRICS_TOKEN`), not an API key: the
series are every tenant's together, which no tenant may see. Without a token set, nobody may read them.
"""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.auth import bearer_token
from conveyor.metrics import (
    HTTP_REQUEST_SECONDS,
    HTTP_REQUESTS,
    JOBS_REJECTED,
    exposed_registry,
    flush_tallies,
)
from conveyor.problems import PROBLEM_SCOPE_KEY, Problem, unauthorized

METRICS_PATH = "/metrics"
# The `route` of a request no route matched (an unknown path, or one refused before routing).
UNMATCHED_ROUTE = "(unmatched)"
# The submission routes, whose refusals are counted by reason.
SUBMISSION_PATHS = frozenset({"/v1/jobs", "/v1/jobs/batch"})
# Why a submission was refused, by its status; a 429 is named by the limit it hit.
REJECTION_REASONS = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}
OTHER_REJECTION = "error"


class HttpMetrics:
    """Count and time every HTTP request the app answers (WebSockets are counted by their service)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The labelled children, by their labels: `.labels()` takes a lock and builds a key every time.
        self._counts: dict[tuple[str, int], Counter] = {}
        self._timings: dict[str, Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless the app starts a response: what the server answers for an exception

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self._observe(scope, status, time.perf_counter() - began)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or UNMATCHED_ROUTE
        counter = self._counts.get((template, status))
        if counter is None:
            counter = self._counts[template, status] = HTTP_REQUESTS.labels(template, str(status))
        counter.inc()
        timing = self._timings.get(template)
        if timing is None:
            timing = self._timings[template] = HTTP_REQUEST_SECONDS.labels(template)
        timing.observe(seconds)
        if status >= 400 and scope["method"] == "POST" and scope["path"] in SUBMISSION_PATHS:
            JOBS_REJECTED.labels(rejection_reason(status, scope.get(PROBLEM_SCOPE_KEY))).inc()


def rejection_reason(status: int, problem: Problem | None) -> str:
    """Why a submission was refused: `rate` or `max_queued` for a 429 that says which limit, else what
    its status means."""
    if status == 429 and problem is not None and isinstance(limit := problem.extensions.get("limit"), str):
        return limit
    return REJECTION_REASONS.get(status, OTHER_REJECTION)


def metrics_router(token: SecretStr) -> APIRouter:
    """`GET /metrics`: the service's series in Prometheus' text format (this process's, or in
    multiprocess mode every process's), for the bearer of `token`."""
    router = APIRouter()

    @router.get(METRICS_PATH, include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if not token_accepted(request.headers.get("authorization"), token.get_secret_value()):
            raise unauthorized("send the metrics token (CONVEYOR_METRICS_TOKEN) as `Authorization: Bearer`")
        flush_tallies()  # this process's, up to now; the others' at their next TALLY_FLUSH_S
        return Response(generate_latest(exposed_registry()), media_type=CONTENT_TYPE_LATEST)

    return router


def token_accepted(authorization: str | None, token: str) -> bool:
    """Whether the header carries `token`; never with no token set. Compared in constant time."""
    presented = bearer_token(authorization)
    if not token or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), token.encode())
