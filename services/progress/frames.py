"""WebSocket frames written straight to a socket's transport: each event's frame is built once and
the same bytes go to every subscriber that keeps up, with no await and no copy per subscriber.

A server's frames are not masked (RFC 6455 5.1), so one event's text frame is the same bytes for
every connection that did not negotiate an extension (permessage-deflate is off by default; a socket
that negotiated it gets its frames from `websockets`, one by one).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame

from conveyor.events import JobEvent
from conveyor.logs import WEBSOCKET_LOGGER
from services.progress.keepalive import Keepalive, KeepaliveSlot, keepalive_for

# The scope extension through which a connection reaches its own protocol object.
DIRECT_WRITE_EXTENSION = "conveyor.direct_write"
# A socket with more than this waiting in its transport's buffer is slow: its events go through its
# channel's queue, where progress events coalesce, instead of straight to the transport.
DIRECT_WRITE_MAX_BUFFERED = 16 * 1024
# Where each socket's own lines go: quiet below DEBUG (`conveyor.logs.WEBSOCKET_LOGGER`).
SOCKET_LOGGER = logging.getLogger(WEBSOCKET_LOGGER)

_FIN_TEXT = 0x81

S = TypeVar("S")


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final text frame."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN_TEXT, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return header + payload


class _Last(Generic[S]):
    """The bytes built from the last object asked for. The hub hands one event (or a job's events
    from one fetch) to all its listeners in a row, and one batched read hands one replay to all the
    resumes of a job from the same seq: remembering the last is enough for each to be built once,
    not once per socket."""

    def __init__(self, build: Callable[[S], bytes]) -> None:
        self._build = build
        self._source: S | None = None
        self._built = b""

    def of(self, source: S) -> bytes:
        if source is not self._source:
            self._built = self._build(source)
            self._source = source
        return self._built


def _event_frame(event: JobEvent) -> bytes:
    return text_frame(event.as_json().encode())


_last_frame = _Last[JobEvent](_event_frame)
_last_frames = _Last[Sequence[JobEvent]](lambda events: b"".join(_event_frame(event) for event in events))


def event_frames(events: Sequence[JobEvent]) -> bytes:
    """The frames of a job's events, one after the other: the bytes every subscriber is written."""
    return _last_frame.of(events[0]) if len(events) == 1 else _last_frames.of(events)


class DirectWriter:
    """Writes an event's frame to one socket's transport when the socket can take it at once.

    It is called once per event and subscriber, so it tests only what can change after the handshake:
    whether we sent our close, whether the transport is closing (uvicorn closes it once it has
    answered the peer's close, or on a protocol error) or lost, and how much it holds unsent. A
    transport that paused writing holds more than its high-water mark, so the size test covers that.
    """

    __slots__ = ("_protocol", "_transport")

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def write(self, event: JobEvent) -> bool:
        """True if the frame was written; False if the caller must queue the event instead."""
        if not self._can_write():
            return False
        self._transport.write(_last_frame.of(event))
        return True

    def write_all(self, events: Sequence[JobEvent]) -> bool:
        """Several events' frames (a resume's replay, a job's events from one fetch) in one write: one
        system call, not one each. False, with nothing written, if the caller must send them one by
        one instead."""
        if not self._can_write():
            return False
        self._transport.write(_last_frames.of(events))
        return True

    def writable_transport(self) -> asyncio.WriteTransport | None:
        """The transport, if it can take a write now: for a fan-out to write the job's next events
        to (`fanout.Fanout`), which tests for itself, on each write, what can change."""
        return self._transport if self._can_write() else None

    def _can_write(self) -> bool:
        protocol = self._protocol
        transport = self._transport
        return not (
            protocol.close_sent
            or protocol.disconnected
            or transport.is_closing()
            or transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BUFFERED
        )


def direct_writer(scope: Mapping[str, Any]) -> DirectWriter | None:
    """The accepted connection's direct writer, when the server is `ProgressWebSocketProtocol` and the
    socket negotiated no extension (a deflated socket's frames differ from everyone else's)."""
    protocol = scope.get("extensions", {}).get(DIRECT_WRITE_EXTENSION)
    if not isinstance(protocol, WebSocketsSansIOProtocol) or protocol.conn.extensions:
        return None
    return DirectWriter(protocol)


class ProgressWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, handing the app its own protocol object (through a scope
    extension) so that events can be written to the transport without an ASGI `send` each, pinged
    from one timer for all sockets (`keepalive`) rather than two timers of its own, and logging the
    socket's open, handshake and close at DEBUG only."""

    _keepalive: Keepalive | None = None
    _keepalive_slot: KeepaliveSlot | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's lines about the socket and websockets' go through a logger of their own.
        self.logger = self.conn.logger = SOCKET_LOGGER

    def start_keepalive(self) -> None:
        if not (self.ping_interval and self.ping_timeout):
            super().start_keepalive()  # no timeout: uvicorn's own pings, which need no deadline
            return
        self._keepalive = keepalive_for(self.loop, self.ping_interval, self.ping_timeout)
        self._keepalive_slot = self._keepalive.start(self)

    def stop_keepalive(self) -> None:
        if self._keepalive_slot is not None:
            Keepalive.stop(self._keepalive_slot)
            self._keepalive_slot = None
        super().stop_keepalive()

    def handle_pong(self, event: Frame) -> None:
        if self._keepalive is None or self._keepalive_slot is None:
            super().handle_pong(event)
            return
        self._keepalive.pong(self._keepalive_slot, bytes(event.data))

    def ping(self, payload: bytes) -> bool:
        if self.close_sent or self.transport.is_closing():
            return False
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    def pong_overdue(self) -> None:
        self.keepalive_timeout()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake is over, and its request and response (headers and all) are not read
            # again: a few KiB per socket for as long as it lives.
            self.request = self.response = None  # type: ignore[assignment]

    async def run_asgi(self) -> None:
        extensions = cast(dict[str, Any], self.scope["extensions"])
        extensions[DIRECT_WRITE_EXTENSION] = self
        await super().run_asgi()
