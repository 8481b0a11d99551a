"""A client's channel: the bounded queue of everything waiting to be sent to one connection.

The hub offers events without ever waiting, so a slow client fills its own queue and nobody else's.
While a job's newest queued item is a progress event, the job's next progress event replaces it (the
newest wins, and it remembers the first `seq` it stands for); state events are never dropped.
A queue that still reaches its limit marks the channel overflowed: the connection is then closed
with a code that tells the client to resume from the last `seq` it got. `stop()` ends the
connection's stream from outside (the client went away, it was idle too long): the stream's next
`get()` returns the reason, ahead of anything queued.

A channel waits on a bare future rather than an `asyncio.Event`: an event holds a deque of its own
(about 700 bytes), and a progress service holds one channel per socket, thousands of them.

Requests from the client (subscribe, unsubscribe, ping) travel through the same queue, so everything
the client is sent keeps the order in which it happened.

A channel whose stream waits on an empty queue may ride its jobs' fan-outs (`fanout.Fanout`): their
events are then written to its socket without being offered to it. Anything put in the queue, or a
stop, takes it out of them first: the jobs' next events are offered again, and wait behind that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor.events import JobEvent
from services.progress.fanout import Fanout, Transport


@dataclass
class QueuedEvent:
    event: JobEvent
    # The oldest seq this item stands for: below `event.seq` when progress events were coalesced.
    first_seq: int


@dataclass(frozen=True)
class Subscribe:
    job_ids: tuple[str, ...]
    after_seq: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Unsubscribe:
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class SubscribeAll:
    pass


@dataclass(frozen=True)
class UnsubscribeAll:
    pass


@dataclass(frozen=True)
class StreamEnd:
    """Why a connection's stream ends: the WebSocket close code (and reason) it ends with."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class Reply:
    """A message for the client as it is (a pong, an error about its last message)."""

    message: dict[str, Any]


Request = Subscribe | Unsubscribe | SubscribeAll | UnsubscribeAll | Reply
Item = QueuedEvent | Request | StreamEnd


class Channel:
    def __init__(self, limit: int, tenant: str) -> None:
        self._limit = limit
        # Whose connection this is: the hub offers it only this tenant's events.
        self.tenant = tenant
        self._items: deque[Item] = deque()
        # Per job, its newest queued item if that item is a progress event: the one a newer one replaces.
        self._coalescible: dict[str, QueuedEvent] = {}
        # The stream's `get()` waiting for an item, if it is waiting.
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self._stopped: StreamEnd | None = None
        # Set by a stream that can write an event at once when nothing is queued before it; True if it
        # did. A client that keeps up thus never has its events queued, nor coalesced. `direct_all`
        # does the same for several events of one job, in one write.
        self.direct: Callable[[JobEvent], bool] | None = None
        self.direct_all: Callable[[Sequence[JobEvent]], bool] | None = None
        # Set by the same stream: whether it may ride a job's fan-out from the given seq on (its
        # transport, if so), and where a fan-out it rode left it (`fanout.Listener`).
        self.rides: Callable[[str, int], Transport | None] | None = None
        self.rode: Callable[[str, int, bool], None] | None = None
        # The fan-outs this channel rides, by job id: left as soon as the channel is given anything.
        self._fanouts: dict[str, Fanout] = {}

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, event: JobEvent) -> None:
        if self.overflowed or self._stopped is not None:
            return
        if self.direct is not None and not self._items and self.direct(event):
            return
        if event.type == "progress":
            queued = self._coalescible.get(event.job_id)
            # Only the next seq: an event that arrived out of order may hide a state change in between.
            if queued is not None and event.seq == queued.event.seq + 1:
                queued.event = event
                return
        item = QueuedEvent(event, first_seq=event.seq)
        if not self._put(item):
            return
        if event.type == "progress":
            self._coalescible[event.job_id] = item
        else:
            self._coalescible.pop(event.job_id, None)

    def offer_all(self, events: Sequence[JobEvent]) -> None:
        """Several events of one job with consecutive seqs, that arrived together (a job's last
        progress report and its terminal event, say): written at once if the socket keeps up, else
        offered one by one."""
        if self.overflowed or self._stopped is not None:
            return
        if self.direct_all is not None and not self._items and self.direct_all(events):
            return
        for event in events:
            self.offer(event)

    def ride(self, fanout: Fanout) -> Transport | None:
        if self._items or self.overflowed or self._stopped is not None or self.rides is None:
            return None
        transport = self.rides(fanout.job_id, fanout.seq)
        if transport is not None:
            self._fanouts[fanout.job_id] = fanout
        return transport

    def left_fanout(self, job_id: str, seq: int, terminal: bool) -> None:
        self._fanouts.pop(job_id, None)
        if self.rode is not None:
            self.rode(job_id, seq, terminal)

    def request(self, request: Request) -> None:
        self._put(request)

    def stop(self, end: StreamEnd) -> None:
        """End the stream: its next `get()` returns `end` (the first reason given, if several)."""
        if self._stopped is None:
            self._stopped = end
            self._leave_fanouts()
            self._wake()

    async def get(self) -> Item:
        while not self._items and self._stopped is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._stopped is not None:
            return self._stopped
        item = self._items.popleft()
        if isinstance(item, QueuedEvent) and self._coalescible.get(item.event.job_id) is item:
            del self._coalescible[item.event.job_id]
        return item

    def _put(self, item: Item) -> bool:
        self._leave_fanouts()
        if self.overflowed or self._stopped is not None:
            return False
        if len(self._items) >= self._limit:
            self.overflowed = True
            return False
        self._items.append(item)
        self._wake()
        return True

    def _leave_fanouts(self) -> None:
        """The stream has something to do: the jobs' next events wait behind it, in this queue."""
        if self._fanouts:
            fanouts, self._fanouts = self._fanouts, {}
            for fanout in fanouts.values():
                fanout.release(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
