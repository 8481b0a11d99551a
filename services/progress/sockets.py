"""The WebSocket endpoints: one job's events, and one socket for many jobs.

Each connection runs its stream (sends what its channel holds) in its own ASGI task and one more
task, its reader (turns client messages into channel requests); a timer closes it when idle. When
either ends, the other does. The hub only puts events in the channel or, for a socket that keeps up,
writes them straight to its transport, so a client that reads slowly never holds anyone else up.

What one client may cost is bounded: uvicorn refuses frames over `CONVEYOR_PROGRESS_WS_MAX_BYTES`
(1009), a socket has `CONVEYOR_PROGRESS_AUTH_TIMEOUT_S` to present its key, its messages are metered
by a token bucket, and its tenant holds at most `CONVEYOR_PROGRESS_TENANT_MAX_SOCKETS` on this instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocket, WebSocketDisconnect

from conveyor.auth import Forbidden, Principal, Unauthenticated, resolve_principal
from conveyor.metrics import WEBSOCKET_CONNECTIONS
from conveyor.tokenbucket import TokenBucket
from services.progress.channel import Channel, Reply, StreamEnd, Subscribe
from services.progress.frames import direct_writer
from services.progress.protocol import (
    PONG,
    AuthMessage,
    BadMessage,
    PingMessage,
    SubscribeMessage,
    UnsubscribeMessage,
    parse_client_message,
    parse_seq,
    requests_for,
)
from services.progress.state import ProgressState, presented_token
from services.progress.streams import (
    CLOSE_BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_MANY,
    CLOSE_TRY_AGAIN_LATER,
    FELL_BEHIND,
    EventStream,
    Outgoing,
    error_message,
)

log = structlog.get_logger(__name__)

MIN_WATCH_S = 0.1
IDLE = StreamEnd(CLOSE_GOING_AWAY, "idle")
# The client closed the socket or the connection dropped: there is nothing left to close.
CLIENT_GONE = StreamEnd(CLOSE_GOING_AWAY, "client went away")
DATABASE_DOWN = StreamEnd(CLOSE_TRY_AGAIN_LATER, "database unavailable: reconnect with after_seq")
TOO_MANY_MESSAGES = StreamEnd(CLOSE_POLICY_VIOLATION, "too_many_messages")

Serve = Callable[[Principal], Awaitable[None]]


async def serve_job_events(websocket: WebSocket, state: ProgressState, job_id: str) -> None:
    """`/v1/jobs/{job_id}/events`: a snapshot (or a replay after `?after_seq=N`), the job's events, its
    terminal event, then close 1000. The client may send pings; nothing else."""

    async def serve(principal: Principal) -> None:
        await _serve_job_events(websocket, state, principal, job_id)

    await _admitted(websocket, state, serve)


async def serve_events(websocket: WebSocket, state: ProgressState) -> None:
    """`/v1/events`: the client subscribes to jobs by id, or to all of its tenant's, and unsubscribes."""

    async def serve(principal: Principal) -> None:
        await _serve_events(websocket, state, principal)

    await _admitted(websocket, state, serve)


async def _admitted(websocket: WebSocket, state: ProgressState, serve: Serve) -> None:
    """Accept the socket, authenticate it, and serve it while it holds one of its tenant's sockets."""
    await websocket.accept()
    WEBSOCKET_CONNECTIONS.inc()
    try:
        principal = await _authenticate(websocket, state)
        if principal is None:
            return
        if not state.sockets.take(principal.tenant):
            detail = f"at most {state.sockets.limit} sockets per tenant on this instance; close one first"
            await _send_and_close(websocket, error_message("too_many_sockets", detail), CLOSE_TOO_MANY)
            return
        try:
            await serve(principal)
        finally:
            state.sockets.give_back(principal.tenant)
    finally:
        WEBSOCKET_CONNECTIONS.dec()


async def _serve_job_events(
    websocket: WebSocket, state: ProgressState, principal: Principal, job_id: str
) -> None:
    given = websocket.query_params.get("after_seq")
    after_seq = parse_seq(given) if given is not None else None
    if given is not None and after_seq is None:
        detail = f"after_seq must be a non-negative integer, got {given[:40]!r}"
        await _send_and_close(websocket, error_message("invalid_after_seq", detail), CLOSE_BAD_REQUEST)
        return
    channel = Channel(state.settings.progress_client_queue, principal.tenant)
    stream = _stream(websocket, state, principal, channel, single_job=True)
    channel.request(Subscribe((job_id,), {job_id: after_seq} if after_seq is not None else {}))

    def on_message(text: str) -> None:
        message = parse_client_message(text)
        if not isinstance(message, PingMessage):
            raise BadMessage(error_message("bad_message", 'this socket takes only {"op": "ping"}'))
        channel.request(Reply(PONG))

    await _run(websocket, state, channel, stream, on_message)


async def _serve_events(websocket: WebSocket, state: ProgressState, principal: Principal) -> None:
    channel = Channel(state.settings.progress_client_queue, principal.tenant)
    stream = _stream(websocket, state, principal, channel, single_job=False)

    def on_message(text: str) -> None:
        message = parse_client_message(text)
        if isinstance(message, PingMessage):
            channel.request(Reply(PONG))
        elif isinstance(message, SubscribeMessage | UnsubscribeMessage):
            for request in requests_for(message):
                channel.request(request)
        else:
            raise BadMessage(error_message("bad_message", "already authenticated"))

    await _run(websocket, state, channel, stream, on_message)


def _stream(
    websocket: WebSocket, state: ProgressState, principal: Principal, channel: Channel, *, single_job: bool
) -> EventStream:
    async def send(message: Outgoing) -> None:
        await websocket.send_text(message.text)

    # Events that come while the socket keeps up go straight to its transport (`frames`).
    direct = direct_writer(websocket.scope)
    return EventStream(state, principal, channel, send, single_job=single_job, direct=direct)


async def _run(
    websocket: WebSocket,
    state: ProgressState,
    channel: Channel,
    stream: EventStream,
    on_message: Callable[[str], None],
) -> None:
    """Run the stream in this task, and the reader in one more: both end when either does."""
    idle = IdleWatch(state.settings.progress_idle_timeout_s, stream, channel)
    allowance = TokenBucket(state.settings.progress_message_rate, state.settings.progress_message_burst)

    async def read() -> StreamEnd:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return CLIENT_GONE
            if allowance.take() > 0:
                log.info("progress.client_too_many_messages")
                return TOO_MANY_MESSAGES
            idle.heard()
            text = message.get("text")
            if text is None:
                channel.request(Reply(error_message("bad_message", "send JSON text frames")))
                continue
            try:
                on_message(text)
            except BadMessage as exc:
                channel.request(Reply(exc.message))

    def reader_done(task: asyncio.Task[StreamEnd]) -> None:
        # However the reader ends (the client gone, too many messages, an error), the stream ends too.
        if not task.cancelled():
            channel.stop(CLIENT_GONE if task.exception() is not None else task.result())

    reader = asyncio.create_task(read())
    reader.add_done_callback(reader_done)
    try:
        end = await _stream_end(stream)
        if end is not CLIENT_GONE:
            # Once a burst of events is out (`EventHub.when_quiet`): 10,000 subscribers of jobs that
            # finish together would otherwise hold up the events that follow. A socket the client
            # closed has nothing to send, and gives its tenant's slot back at once.
            await state.hub.quiet()
        await _close(websocket, channel, reader, end)
    finally:
        idle.cancel()
        reader.cancel()


async def _close(
    websocket: WebSocket, channel: Channel, reader: asyncio.Task[StreamEnd], end: StreamEnd
) -> None:
    """Stop the reader, and close the socket as `end` says (unless the client is gone)."""
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    failure = None if reader.cancelled() else reader.exception()
    if failure is not None and not isinstance(failure, WebSocketDisconnect):
        raise failure
    if end is FELL_BEHIND:
        log.info("progress.client_fell_behind", queued=len(channel))
    if end is not CLIENT_GONE:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(end.code, end.reason)


async def _stream_end(stream: EventStream) -> StreamEnd:
    """Run the stream to its end: how the connection should close (`CLIENT_GONE`: it is closed)."""
    try:
        return await stream.run()
    except WebSocketDisconnect:
        return CLIENT_GONE
    except (SQLAlchemyError, OSError) as exc:
        log.warning("progress.database_unavailable", error=str(exc))
        return DATABASE_DOWN


class IdleWatch:
    """Closes a socket that watches nothing and has said nothing for the idle timeout: a timer
    callback, not a task, and one that a socket with subscriptions sets only once a timeout, so
    thousands of quiet sockets cost no wake-ups."""

    def __init__(self, timeout_s: float, stream: EventStream, channel: Channel) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._stream = stream
        self._channel = channel
        self._last_heard = self._loop.time()
        self._timer = self._loop.call_later(timeout_s, self._check)

    def heard(self) -> None:
        self._last_heard = self._loop.time()

    def cancel(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        waited = self._loop.time() - self._last_heard
        if self._stream.idle and waited >= self._timeout_s:
            self._channel.stop(IDLE)
            return
        wait_s = self._timeout_s - waited if self._stream.idle else self._timeout_s
        self._timer = self._loop.call_later(max(MIN_WATCH_S, wait_s), self._check)


async def _authenticate(websocket: WebSocket, state: ProgressState) -> Principal | None:
    """The key from the `Authorization` header, a `token` query parameter, or an `auth` first message
    (within the auth timeout). A missing or bad key, or one without the read scope, closes the socket
    with 1008 (policy violation): a socket has no 401 and 403 to tell them apart."""
    token = presented_token(websocket)
    if token is None:
        timeout_s = state.settings.progress_auth_timeout_s
        try:
            token = await asyncio.wait_for(_first_message_token(websocket), timeout=timeout_s)
        except TimeoutError:
            detail = f'send {{"op": "auth", "token": "<key>"}} within {timeout_s:g} s of connecting'
            await _send_and_close(websocket, error_message("auth_timeout", detail), CLOSE_POLICY_VIOLATION)
            return None
    try:
        return await resolve_principal(state.authenticator, token, scope="read")
    except (Unauthenticated, Forbidden):
        detail = "send a valid API key with the read scope"
        await _send_and_close(websocket, error_message("unauthorized", detail), CLOSE_POLICY_VIOLATION)
        return None


async def _first_message_token(websocket: WebSocket) -> str | None:
    try:
        message = parse_client_message(await websocket.receive_text())
    except (BadMessage, WebSocketDisconnect, RuntimeError, KeyError):
        return None
    return message.token if isinstance(message, AuthMessage) else None


async def _send_and_close(websocket: WebSocket, message: dict[str, Any], code: int) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(json.dumps(message))
        await websocket.close(code, message["error"])
