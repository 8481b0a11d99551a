"""The request-body limit of every gateway route, enforced on the stream before anything reads it.

A pure ASGI middleware, outside routing, authentication and FastAPI's body parsing (which reads a
declared `Body()` whole before any dependency runs), so no route can be made to hold more than its
limit:

- a `Content-Length` over the limit is answered 413 at once, the body never read;
- a body without one (chunked) is counted as the app reads it, and answered 413 as soon as it passes
  the limit. Nothing is read ahead of the app: a route that refuses a request (no key) before it
  reads the body never reads it at all.

Either way the rest of the body is never held in memory: uvicorn drops what follows a complete
response.

The 413 is a problem document (`conveyor.problems`), like every other error.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.problems import Problem, problem_response

# A batch of up to 1,000 jobs may carry up to this much.
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024
BATCH_PATH = "/v1/jobs/batch"
# The routes whose bodies may be larger than the default (a submission's: `sizes.max_submission_bytes`).
BODY_LIMITS: Mapping[str, int] = {BATCH_PATH: MAX_BATCH_BODY_BYTES}


def body_too_large(limit: int) -> Problem:
    return Problem(413, "Content too large", f"the body exceeds {limit} bytes", slug="body-too-large")


class BodyLimit:
    """Refuse request bodies over `default` bytes (or the path's own limit in `limits`) with a 413."""

    def __init__(self, app: ASGIApp, default: int, limits: Mapping[str, int] = BODY_LIMITS):
        self.app = app
        self.default = default
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        length = declared_length(scope)
        if length is not None and length > limit:
            await send_refusal(scope, send, limit)
            return
        if length is not None:  # uvicorn delivers no more than the declared length: nothing to count
            await self.app(scope, receive, send)
            return
        guard = StreamGuard(scope, receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except ClientDisconnect:
            if not guard.refused:
                raise
            # The app read on after the limit and was told the client had gone: the 413 is sent.


class StreamGuard:
    """A body without `Content-Length`, counted as the app reads it. Past the limit, the 413 is sent
    and the app is told the client disconnected; whatever the app answers then is dropped."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        self._scope = scope
        self._receive = receive
        self._send = send
        self._limit = limit
        self._size = 0
        self._started = False
        self.refused = False

    async def receive(self) -> Message:
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self._size += len(message.get("body", b""))
            if self._size > self._limit:
                self.refused = True
                if not self._started:
                    await send_refusal(self._scope, self._send, self._limit)
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return
        self._started = True
        await self._send(message)


async def send_refusal(scope: Scope, send: Send, limit: int) -> None:
    response = problem_response(body_too_large(limit), Request(scope))
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}  # a plain response never asks; the body stays unread


def declared_length(scope: Scope) -> int | None:
    """The request's `Content-Length`, if it declares one (a malformed one counts as too large)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 2**63
    return None
