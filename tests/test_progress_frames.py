"""Frames written straight to a transport, and the channel's direct path for clients that keep up."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from services.progress.channel import Channel
from services.progress.frames import text_frame
from tests.test_progress_channel import drain, event


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536])
def test_a_text_frame_parses_back_to_its_payload(size: int) -> None:
    payload = b"x" * size
    reader = StreamReader()
    reader.feed_data(text_frame(payload))
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("the frame is incomplete")
    except StopIteration as done:
        frame: Frame = done.value
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)


async def test_events_go_direct_while_nothing_is_queued_and_queue_behind_what_is() -> None:
    channel = Channel(limit=10, tenant="t")
    written: list[int] = []
    accepting = True

    def direct(offered: object) -> bool:
        if not accepting:
            return False
        written.append(offered.seq)  # type: ignore[attr-defined]
        return True

    channel.direct = direct
    channel.offer(event(1))
    channel.offer(event(2))
    assert written == [1, 2] and len(channel) == 0
    accepting = False  # a slow client: its events queue, and consecutive progress events coalesce
    channel.offer(event(3))
    accepting = True
    channel.offer(event(4))  # something is queued: this one must queue behind it, never overtake it
    assert written == [1, 2]
    assert await drain(channel) == [("j1", 3, 4)]
