"""WebSocket keepalive pings for every socket of a process, from one timer.

uvicorn pings each socket from timers of its own: two loop timers per socket and ping (the next ping,
the pong's deadline), each a handle, a context and a bound method. At 10,000 sockets that is tens of
thousands of young objects alive at any moment, which Python's garbage collector then walks in the
middle of a burst of events (40 and 80 ms in `bench/progress_fanout.py --subscribers 10000`).

Here one timer ticks every TICK_S while any socket is kept alive. Every socket of a server waits the
same interval for its next ping and the same timeout for its pong, so the sockets queue in the order
they are due, and a tick takes those at the front: it pings the due ones (at most PINGS_PER_TICK, so
that 10,000 sockets that connected together are not all pinged in one turn of the loop) and fails
those whose pong is late (1011, as uvicorn does). A pong in time queues the socket for its next ping.
A socket's one `KeepaliveSlot` is what waits in the queues; the times and payloads wait beside it, as
floats and bytes, which the collector does not track.
"""

from __future__ import annotations

import asyncio
import random
import struct
import weakref
from collections import deque
from typing import Protocol

# How often the timer ticks at most; with short intervals (tests), a quarter of the interval.
TICK_S = 0.5
# Pings sent in one tick at most: the rest wait for the next tick.
PINGS_PER_TICK = 1000


class KeptAlive(Protocol):
    """The socket side of a keepalive (`frames.ProgressWebSocketProtocol`)."""

    def ping(self, payload: bytes) -> bool:
        """Send a ping with this payload; False if the socket is closing and needs none."""

    def pong_overdue(self) -> None:
        """The pong did not come in time: fail the connection."""


class KeepaliveSlot:
    """One socket's place in its keepalive: the socket (None once stopped) and the payload of the
    ping it owes a pong for."""

    __slots__ = ("payload", "socket")

    def __init__(self, socket: KeptAlive) -> None:
        self.socket: KeptAlive | None = socket
        self.payload: bytes | None = None


class Keepalive:
    """The pings of every socket that uses this interval and timeout on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float, timeout_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._tick_s = min(TICK_S, interval_s / 4, timeout_s / 4)
        self._ping_at: deque[float] = deque()
        self._to_ping: deque[KeepaliveSlot] = deque()
        self._pong_by: deque[float] = deque()
        self._awaiting: deque[KeepaliveSlot] = deque()
        self._awaited: deque[bytes] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, socket: KeptAlive) -> KeepaliveSlot:
        """Ping `socket` an interval from now, and an interval after each pong."""
        slot = KeepaliveSlot(socket)
        self._queue_ping(slot)
        return slot

    @staticmethod
    def stop(slot: KeepaliveSlot) -> None:
        """No more pings: the slot's queued entries are skipped when they come up."""
        slot.socket = slot.payload = None

    def pong(self, slot: KeepaliveSlot, payload: bytes) -> None:
        """A pong: if it answers the ping in flight, the next ping is queued (else it is ignored)."""
        if slot.socket is not None and slot.payload is not None and slot.payload == payload:
            slot.payload = None
            self._queue_ping(slot)

    def _queue_ping(self, slot: KeepaliveSlot) -> None:
        self._ping_at.append(self._loop.time() + self._interval_s)
        self._to_ping.append(slot)
        self._arm()

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        pinged = 0
        while self._ping_at and self._ping_at[0] <= now and pinged < PINGS_PER_TICK:
            self._ping_at.popleft()
            slot = self._to_ping.popleft()
            if slot.socket is None:
                continue
            payload = struct.pack("!I", random.getrandbits(32))
            if slot.socket.ping(payload):
                slot.payload = payload
                self._pong_by.append(now + self._timeout_s)
                self._awaiting.append(slot)
                self._awaited.append(payload)
                pinged += 1
        while self._pong_by and self._pong_by[0] <= now:
            self._pong_by.popleft()
            slot = self._awaiting.popleft()
            payload = self._awaited.popleft()
            if slot.socket is not None and slot.payload is payload:
                socket = slot.socket
                self.stop(slot)
                socket.pong_overdue()
        if self._ping_at or self._pong_by:
            self._arm()


_keepalives: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[float, float], Keepalive]] = (
    weakref.WeakKeyDictionary()
)


def keepalive_for(loop: asyncio.AbstractEventLoop, interval_s: float, timeout_s: float) -> Keepalive:
    """The loop's keepalive for this interval and timeout (one per server, in practice)."""
    by_setting = _keepalives.setdefault(loop, {})
    keepalive = by_setting.get((interval_s, timeout_s))
    if keepalive is None:
        keepalive = by_setting[(interval_s, timeout_s)] = Keepalive(loop, interval_s, timeout_s)
    return keepalive
