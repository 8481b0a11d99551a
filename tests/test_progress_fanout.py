"""A job's fan-out (`services.progress.fanout.Fanout`) through the hub that holds it: which watchers
ride, what is written to their transports, and where each one is left when it stops riding."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conveyor.events import JobEvent
from conveyor.lifecycle import JobState
from services.progress.fanout import Fanout
from services.progress.frames import DIRECT_WRITE_MAX_BUFFERED, event_frames
from services.progress.hub import QUIET_S, EventHub
from tests.test_progress_channel import event
from tests.test_progress_stream import FrameRecorder

from harness import eventually

JOB = "j1"
TENANT = "t"


class Watcher:
    """A listener whose stream waits on an empty queue, at `cursor`, unless `busy`."""

    def __init__(self, cursor: int = 1, tenant: str = TENANT) -> None:
        self.tenant = tenant
        self.cursor = cursor
        self.busy = False
        self.socket = FrameRecorder()
        self.offered: list[int] = []
        self.left: list[tuple[int, bool]] = []

    def offer(self, offered: JobEvent) -> None:
        self.offered.append(offered.seq)
        # As a stream's direct path does: the next event goes straight to a waiting socket.
        if not self.busy and offered.seq == self.cursor + 1:
            self.socket.write(event_frames([offered]))
            self.cursor = offered.seq

    def offer_all(self, events: Sequence[JobEvent]) -> None:
        for offered in events:
            self.offer(offered)

    def ride(self, fanout: Fanout) -> FrameRecorder | None:
        return self.socket if not self.busy and self.cursor == fanout.seq else None

    def left_fanout(self, job_id: str, seq: int, terminal: bool) -> None:
        assert job_id == JOB
        self.left.append((seq, terminal))
        self.cursor = seq


def hand_out(hub: EventHub, seq: int, kind: str = "progress") -> None:
    """One event of the job, as one fetch from the events topic brings it."""
    hub.dispatch(JOB.encode(), event(seq, kind, JOB).as_json().encode())


def watching(hub: EventHub, *watchers: Watcher) -> None:
    for watcher in watchers:
        hub.watch_job(JOB, watcher)
        hub.ride(JOB, watcher, watcher.cursor)  # what a stream asks once it waits


async def test_riders_are_written_each_next_event_and_not_offered_it() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    riders = [Watcher(), Watcher()]
    watching(hub, *riders)
    hand_out(hub, 2)
    hand_out(hub, 3)
    for rider in riders:
        assert rider.socket.writes == [[2], [3]]
        assert rider.offered == [] and rider.left == []


async def test_a_watcher_that_is_busy_or_elsewhere_is_offered_and_rides_once_it_took_an_event() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    rider, busy, behind = Watcher(), Watcher(), Watcher(cursor=0)
    busy.busy = True
    watching(hub, rider, busy, behind)
    hand_out(hub, 2)
    # `behind` is not at the riders' seq: it is offered 2, which its stream would fill in before.
    assert (rider.offered, busy.offered, behind.offered) == ([], [2], [2])
    assert busy.socket.writes == [] and behind.socket.writes == []
    busy.busy, busy.cursor = False, 2  # its stream sent the 2 it had queued, and waits again
    hand_out(hub, 3)  # busy takes it straight to its socket: it rides from here
    hand_out(hub, 4)
    assert busy.offered == [2, 3] and busy.socket.writes == [[3], [4]]
    assert rider.socket.writes == [[2], [3], [4]]


async def test_an_event_that_is_not_the_next_one_releases_every_rider_where_it_was() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    riders = [Watcher(), Watcher()]
    watching(hub, *riders)
    hand_out(hub, 2)
    hand_out(hub, 2)  # a repeat (a republished event): not the next one
    for rider in riders:
        assert rider.left == [(2, False)]
        assert rider.offered == [2]  # each stream drops the repeat itself
    # These streams had nothing to queue, so they ride again at 2 at once.
    hand_out(hub, 5)  # a hole: 3 and 4 have not come
    for rider in riders:
        assert rider.left == [(2, False), (2, False)]
        assert rider.offered == [2, 5]  # each stream fills the hole from the history itself
        assert rider.socket.writes == [[2]]


async def test_a_rider_that_holds_too_much_unsent_leaves_after_the_write_and_a_closing_one_before() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    keeps_up, slow, closing = Watcher(), Watcher(), Watcher()
    watching(hub, keeps_up, slow, closing)
    slow.socket.buffered = DIRECT_WRITE_MAX_BUFFERED + 1
    closing.socket.closing = True
    hand_out(hub, 2)
    assert slow.socket.writes == [[2]] and slow.left == [(2, False)]
    assert closing.left == [(1, False)]  # not written 2: it is offered 2, as every non-rider is
    assert slow.offered == closing.offered == [2]  # slow's stream drops it as a repeat
    slow.busy = closing.busy = True  # their channels queue what they are offered now
    hand_out(hub, 3)
    assert keeps_up.socket.writes == [[2], [3]] and keeps_up.offered == []
    assert slow.offered == closing.offered == [2, 3]  # back on their channels' path


async def test_the_terminal_event_is_written_at_once_and_the_subscriptions_end_once_the_hub_is_quiet() -> (
    None
):
    hub = EventHub("unused:9092", "fanout-test")
    riders = [Watcher() for _ in range(40)]  # more than one callback's worth
    watching(hub, *riders)
    loop = asyncio.get_running_loop()
    handed_out = loop.time()
    hand_out(hub, 2, "state")
    hub.dispatch(JOB.encode(), event(3, "state", JOB, JobState.SUCCEEDED).as_json().encode())
    assert all(rider.socket.writes == [[2], [3]] for rider in riders)
    assert all(rider.left == [] for rider in riders)  # not yet: the hub has just handed it out
    await eventually(
        lambda: all(rider.left == [(3, True)] for rider in riders), 5.0, "every subscription ended"
    )
    assert loop.time() - handed_out >= QUIET_S
    # A repeat of the terminal event: their subscriptions are over.
    hub.dispatch(JOB.encode(), event(3, "state", JOB, JobState.SUCCEEDED).as_json().encode())
    assert all(rider.offered == [] and rider.socket.writes == [[2], [3]] for rider in riders)


async def test_riders_get_only_their_own_tenants_events() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    ours, theirs = Watcher(), Watcher(tenant="other")
    watching(hub, ours, theirs)
    hand_out(hub, 2)  # the event is tenant t's
    assert ours.socket.writes == [[2]]
    assert theirs.socket.writes == [] and theirs.offered == []


async def test_a_job_is_forgotten_once_its_last_watcher_unwatches_it_rider_or_not() -> None:
    hub = EventHub("unused:9092", "fanout-test")
    rider, offered = Watcher(), Watcher(cursor=0)
    watching(hub, rider, offered)
    hub.unwatch_job(JOB, rider)
    hub.unwatch_job(JOB, offered)
    assert hub._by_job == {}
    hand_out(hub, 2)
    assert rider.socket.writes == [] and rider.left == []
