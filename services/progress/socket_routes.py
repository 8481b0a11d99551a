"""The service's WebSocket endpoints, reached straight from the server rather than through the HTTP
app's middleware and router.

A WebSocket is routed once and then lives for hours, and each layer it passes through (the HTTP
metrics, CORS, the exception middlewares, FastAPI's dependency and exit stacks) stays on its call
stack all that time: about 10 KiB of a connection's memory, and CPU at every connect
(bench/progress_memory.py).
None of those layers does anything for a WebSocket. Every other scope, and a WebSocket to any other
path, goes to the HTTP app, which refuses it as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from services.progress import sockets
from services.progress.state import ProgressState

JOB_EVENTS_PATH = re.compile(r"/v1/jobs/(?P<job_id>[^/]+)/events")
EVENTS_PATH = "/v1/events"

Endpoint = Callable[[WebSocket, ProgressState], Awaitable[None]]


class SocketRoutes:
    """`/v1/jobs/{job_id}/events`: a snapshot of the job (or, with `?after_seq=N`, the events after N),
    then each new event, then the terminal event, then close 1000.

    `/v1/events`: many jobs on one socket: `subscribe` / `unsubscribe` by `job_ids`, or `all` of the
    tenant's."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope) if scope["type"] == "websocket" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        await endpoint(WebSocket(scope, receive, send), self.app.state.progress)

    @staticmethod
    def _endpoint(scope: Scope) -> Endpoint | None:
        path: str = scope["path"]
        if path == EVENTS_PATH:
            return sockets.serve_events
        match = JOB_EVENTS_PATH.fullmatch(path)
        if match is None:
            return None
        job_id = match["job_id"]

        async def job_events(websocket: WebSocket, state: ProgressState) -> None:
            await sockets.serve_job_events(websocket, state, job_id)

        return job_events
