"""A job's watchers of one tenant, and the fan-out of its events to the sockets that keep up.

Most subscribers of a job keep up: each of its events is written straight to their socket the moment
it arrives. Handing an event to each subscriber's channel and stream for that (`Channel.offer`, then
the stream's direct writer) cost ~7 µs of the progress service's CPU per socket at 10,000 subscribers,
most of it cache misses on the objects of each connection in turn, beside ~12 µs for the kernel's
write. When 20 jobs start or end together, that is 10,000 writes in a row, and the last subscriber
gets its event a quarter of a second after the first.

So a `Fanout` keeps the transports of its riders: the watchers that were sent the job's last event
(`seq`) and wait on an empty queue. The job's next event is written to each of them in one loop that
touches nothing but the transport, and their streams' cursors stay where they were: the fan-out holds
the seq they are at. A rider leaves, and is told how far it was sent (`Listener.left_fanout`), when:
- its channel is given anything (a request, an event of another job) or stopped: its stream has
  something to do, and the job's events must wait behind it as before (`Channel`);
- its transport holds more than `DIRECT_WRITE_MAX_BUFFERED` unsent once written to, or is closing:
  a slow client's events queue, and coalesce, in its channel;
- an event comes that is not the next one (a repeat, or one before a hole): its stream sorts it out;
- the job's terminal event was written: its subscription is over.
Every other watcher is offered each event one by one (`offered`). It joins the riders once it waits on
an empty queue at their seq: when its stream is done with what it had to do (a subscription's
snapshot, say: `join`), or once it took an event straight to its socket (`take_riders`).

The seq a rider joins at may be ahead of the events the hub has handed out (a snapshot read from the
database before its event came from Kafka). That event then comes as a repeat, which is not the next
one: the riders are released, their streams drop it, and they join again.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from conveyor.events import JobEvent
from conveyor.metrics import EVENT_DELIVERY_TALLY
from services.progress.frames import DIRECT_WRITE_MAX_BUFFERED, event_frames

# The riders told at once that their job ended, in one of the hub's `when_quiet` callbacks (it runs
# QUIET_CALLBACKS_PER_TURN of those per turn of the loop: ~500 riders, ~4 ms, between its I/O).
ENDED_PER_CALLBACK = 16


class Transport(Protocol):
    """What a fan-out asks of a socket's transport (an asyncio `WriteTransport`)."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


class Listener(Protocol):
    @property
    def tenant(self) -> str:
        """The tenant whose events, and only whose, this listener may be offered."""

    def offer(self, event: JobEvent) -> None:
        """Take an event without blocking: the hub never waits for one client."""

    def offer_all(self, events: Sequence[JobEvent]) -> None:
        """Take several events of one job, with consecutive seqs, without blocking."""

    def ride(self, fanout: Fanout) -> Transport | None:
        """The transport to write the job's next events to, if this listener was sent the job's
        events up to `fanout.seq` and waits on an empty queue; None leaves it offered one by one."""

    def left_fanout(self, job_id: str, seq: int, terminal: bool) -> None:
        """It no longer rides the job's fan-out, which wrote it the job's events up to `seq` (the
        terminal event, if `terminal`)."""


class Fanout:
    __slots__ = ("_riders", "_when_quiet", "job_id", "offered", "seq")

    def __init__(self, job_id: str, when_quiet: Callable[[Callable[[], None]], None]) -> None:
        self.job_id = job_id
        # The hub's `when_quiet`: what can wait until a burst of events is out.
        self._when_quiet = when_quiet
        # The last seq written to every rider (meaningless while there are none).
        self.seq = 0
        # The watchers that are offered each event.
        self.offered: set[Listener] = set()
        # The riders, with the transport each event is written to.
        self._riders: dict[Listener, Transport] = {}

    def __bool__(self) -> bool:
        return bool(self.offered or self._riders)

    def __len__(self) -> int:
        return len(self.offered) + len(self._riders)

    def rides(self, listener: Listener) -> bool:
        return listener in self._riders

    def add(self, listener: Listener) -> None:
        if listener not in self._riders:
            self.offered.add(listener)

    def discard(self, listener: Listener) -> None:
        """The listener stops watching the job: it is not told anything."""
        self.offered.discard(listener)
        self._riders.pop(listener, None)

    def release(self, listener: Listener) -> None:
        """The rider has something else to do: it goes back to being offered each event."""
        if self._riders.pop(listener, None) is not None:
            self.offered.add(listener)
            listener.left_fanout(self.job_id, self.seq, False)

    def write(self, events: Sequence[JobEvent]) -> int:
        """Write a job's events (consecutive seqs) to every rider, if the first is the next one;
        else release them all, to be offered it. How many were written to."""
        riders = self._riders
        if not riders:
            return 0
        before = self.seq
        if events[0].seq != before + 1:
            self._release_all(before)
            return 0
        frame = event_frames(events)
        closing: list[Transport] = []
        slow: list[Transport] = []
        for transport in riders.values():
            if transport.is_closing():
                closing.append(transport)
                continue
            transport.write(frame)
            if transport.get_write_buffer_size() > DIRECT_WRITE_MAX_BUFFERED:
                slow.append(transport)
        last = events[-1]
        self.seq = last.seq
        written = len(riders) - len(closing)
        # One clock reading for the whole loop (its end: the latest of the writes).
        now = time.time()
        for event in events:
            EVENT_DELIVERY_TALLY.observe(max(0.0, now - event.at_s), written)
        if closing:
            self._release_transports(closing, before)
        if last.is_terminal:
            self._end_all(last.seq)
        elif slow:
            self._release_transports(slow, last.seq)
        return written

    def join(self, listener: Listener, seq: int) -> None:
        """A watcher that was sent the job's events up to `seq` now waits on an empty queue: it rides
        if the riders are at the same seq (or there are none yet), and it may (`Listener.ride`)."""
        if listener not in self.offered or (self._riders and seq != self.seq):
            return
        self.seq = seq
        transport = listener.ride(self)
        if transport is not None:
            self.offered.discard(listener)
            self._riders[listener] = transport

    def take_riders(self, last: JobEvent) -> None:
        """After `last` was offered: the offered watchers now at its seq and waiting ride from here."""
        if last.is_terminal or not self.offered:
            return
        if self._riders and self.seq != last.seq:
            return  # cannot happen: the riders were written `last` or released
        self.seq = last.seq
        for listener in list(self.offered):
            transport = listener.ride(self)
            if transport is not None:
                self.offered.discard(listener)
                self._riders[listener] = transport

    def _end_all(self, seq: int) -> None:
        """The job's terminal event is out to every rider: each subscription is over. Telling their
        streams (which end them, unwatch the job and close one-job sockets) costs ~8 µs a rider, and
        waits until the hub is quiet: 20 jobs ending together would otherwise hold up each other's
        terminal events by 10,000 of those. Meanwhile the riders are neither offered nor written the
        job's events: a job has none after its terminal event but repeats."""
        ended = list(self._riders)
        self._riders.clear()
        for start in range(0, len(ended), ENDED_PER_CALLBACK):
            chunk = ended[start : start + ENDED_PER_CALLBACK]
            self._when_quiet(functools.partial(_tell_ended, chunk, self.job_id, seq))

    def _release_all(self, seq: int) -> None:
        released = list(self._riders)
        self._riders.clear()
        self.offered.update(released)
        for listener in released:
            listener.left_fanout(self.job_id, seq, False)

    def _release_transports(self, transports: list[Transport], seq: int) -> None:
        leaving = set(transports)
        released = [listener for listener, transport in self._riders.items() if transport in leaving]
        for listener in released:
            del self._riders[listener]
            self.offered.add(listener)
        for listener in released:
            listener.left_fanout(self.job_id, seq, False)


def _tell_ended(listeners: list[Listener], job_id: str, seq: int) -> None:
    for listener in listeners:
        listener.left_fanout(job_id, seq, True)
