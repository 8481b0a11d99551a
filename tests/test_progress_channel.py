"""A client's channel: bounded, coalescing only consecutive progress events, never state events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from conveyor.events import JobEvent, Progress
from conveyor.lifecycle import JobState
from services.progress.channel import Channel, QueuedEvent, Reply


def event(
    seq: int, kind: str = "progress", job_id: str = "j1", status: JobState = JobState.RUNNING
) -> JobEvent:
    return JobEvent(
        job_id=job_id,
        tenant="t",
        seq=seq,
        type=kind,  # type: ignore[arg-type]
        status=status,
        progress=Progress(percent=float(seq)),
        attempt=1,
        at=datetime.now(UTC),
    )


async def drain(channel: Channel) -> list[tuple[str, int, int]]:
    items = []
    while len(channel):
        item = await channel.get()
        assert isinstance(item, QueuedEvent)
        items.append((item.event.job_id, item.first_seq, item.event.seq))
    return items


async def test_consecutive_progress_events_of_a_job_coalesce_to_the_newest() -> None:
    channel = Channel(limit=10, tenant="t")
    for seq in (3, 4, 5):
        channel.offer(event(seq))
    channel.offer(event(9, job_id="j2"))
    channel.offer(event(6))
    assert await drain(channel) == [("j1", 3, 6), ("j2", 9, 9)]


async def test_state_events_are_never_coalesced_and_end_a_run_of_progress() -> None:
    channel = Channel(limit=10, tenant="t")
    channel.offer(event(3))
    channel.offer(event(4, "state", status=JobState.QUEUED))
    channel.offer(event(5, "state", status=JobState.RUNNING))
    channel.offer(event(6))
    channel.offer(event(7))
    assert await drain(channel) == [("j1", 3, 3), ("j1", 4, 4), ("j1", 5, 5), ("j1", 6, 7)]


async def test_an_out_of_order_progress_event_is_not_coalesced() -> None:
    # Between 3 and 5 there may be a state event that has not arrived yet: 5 must not stand for it.
    channel = Channel(limit=10, tenant="t")
    channel.offer(event(3))
    channel.offer(event(5))
    assert await drain(channel) == [("j1", 3, 3), ("j1", 5, 5)]


async def test_a_taken_item_is_no_longer_coalesced_into() -> None:
    channel = Channel(limit=10, tenant="t")
    channel.offer(event(3))
    assert await drain(channel) == [("j1", 3, 3)]
    channel.offer(event(4))
    assert await drain(channel) == [("j1", 4, 4)]


async def test_a_full_channel_overflows_and_takes_nothing_more() -> None:
    channel = Channel(limit=2, tenant="t")
    channel.offer(event(1, "state", status=JobState.QUEUED))
    channel.request(Reply({"type": "pong"}))
    assert not channel.overflowed
    channel.offer(event(2, "state"))
    assert channel.overflowed
    channel.offer(event(3, "state"))
    assert len(channel) == 2


async def test_a_jobs_events_offered_together_go_to_the_direct_writer_together_if_nothing_is_queued() -> None:
    channel = Channel(limit=10, tenant="t")
    together: list[list[int]] = []

    def direct_all(events: Sequence[JobEvent]) -> bool:
        together.append([offered.seq for offered in events])
        return True

    channel.direct_all = direct_all
    channel.offer_all([event(1), event(2, "state")])
    assert together == [[1, 2]] and len(channel) == 0
    channel.request(Reply({"type": "pong"}))
    # Behind the queued reply, they queue one by one (and progress events coalesce as ever).
    channel.offer_all([event(3), event(4), event(5, "state")])
    assert together == [[1, 2]]
    assert isinstance(await channel.get(), Reply)
    assert await drain(channel) == [("j1", 3, 4), ("j1", 5, 5)]


async def test_events_offered_together_that_the_direct_writer_refuses_are_queued() -> None:
    channel = Channel(limit=10, tenant="t")
    channel.direct_all = lambda events: False
    channel.offer_all([event(1), event(2, "state")])
    assert await drain(channel) == [("j1", 1, 1), ("j1", 2, 2)]
