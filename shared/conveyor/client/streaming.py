"""A job's live events over the progress service's WebSocket, across dropped connections.

The key goes in the first message (`{"op": "auth", ...}`), not in the URL, so no proxy logs it. On a
dropped connection (or a close that asks for it: the server restarting, 1013, 4008) the stream
connects again with `?after_seq=` the last `seq` it handed out: the server replays what was missed,
and anything at or below that `seq` is dropped, so the caller sees each event once, in order.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conveyor.client.errors import (
    ConveyorError,
    NotFound,
    Problem,
    RateLimited,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from conveyor.client.models import Event

# Give up when no connection could be made (or none carried a message) for this long.
DEFAULT_RECONNECT_WITHIN_S = 60.0
RECONNECT_BASE_S = 0.2
RECONNECT_CAP_S = 5.0
# Close codes that end the stream rather than ask for a reconnect (an error message said why).
FINAL_CLOSE_CODES = frozenset({1008, 1009, 4400, 4404, 4429})
# The server's `error` messages on a job's socket, as exceptions.
STREAM_ERRORS: dict[str, tuple[type[ConveyorError], int]] = {
    "unauthorized": (Unauthorized, 401),
    "auth_timeout": (Unauthorized, 401),
    "unknown_job": (NotFound, 404),
    "invalid_after_seq": (ValidationFailed, 422),
    "bad_message": (ValidationFailed, 422),
}


class _Reconnect(Exception):
    """The connection ended before the job's terminal event: connect again."""


async def job_events(
    url: str,
    api_key: str,
    *,
    after_seq: int | None = None,
    open_timeout_s: float = 10.0,
    reconnect_within_s: float = DEFAULT_RECONNECT_WITHIN_S,
) -> AsyncIterator[Event]:
    """The events of the job whose stream is at `url` (its `links.events`): its snapshot (unless
    `after_seq` is given: then only the events after it), then each event up to the terminal one."""
    loop = asyncio.get_running_loop()
    last_seq = after_seq
    failures = 0
    failing_since: float | None = None  # since when no connection carried a message
    while True:
        target = url if last_seq is None else f"{url}?after_seq={last_seq}"
        try:
            # No frame limit: an event carries the job's result, which may be over websockets' 1 MiB.
            async with websockets.connect(target, max_size=None, open_timeout=open_timeout_s) as socket:
                await socket.send(json.dumps({"op": "auth", "token": api_key}))
                async for raw in socket:
                    message = json.loads(raw)
                    failing_since, failures = None, 0
                    event = _event_of(message)
                    if event is None or (last_seq is not None and event.seq <= last_seq):
                        continue  # a `resumed` notice, or an event handed out already
                    last_seq = event.seq
                    yield event
                    if event.terminal:
                        return
                if socket.close_code in FINAL_CLOSE_CODES:
                    raise ConveyorError(Problem(400, "Stream closed", socket.close_reason or None))
                raise _Reconnect
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, _Reconnect) as exc:
            failures += 1
            failing_since = loop.time() if failing_since is None else failing_since
            if loop.time() - failing_since > reconnect_within_s:
                raise Unavailable(Problem(503, "Event stream unreachable", f"{url}: {exc!r}"), None) from exc
            await asyncio.sleep(random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**failures)))


def _event_of(message: dict[str, Any]) -> Event | None:
    kind = message.get("type")
    if kind == "error":
        raise _stream_error(message)
    if kind in ("snapshot", "state", "progress"):
        return Event.from_message(message)
    return None  # `resumed`, `pong`: nothing for the caller


def _stream_error(message: dict[str, Any]) -> ConveyorError:
    error = str(message.get("error"))
    detail = str(message.get("detail") or error)
    if error == "too_many_sockets":
        return RateLimited(Problem(429, "Too many sockets", detail, body=message), None)
    kind, status = STREAM_ERRORS.get(error, (ConveyorError, 400))
    return kind(Problem(status, error.replace("_", " ").capitalize(), detail, body=message))
