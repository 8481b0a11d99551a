"""The shared keepalive (`services.progress.keepalive`): pings from one timer, pongs, deadlines."""

from __future__ import annotations

import asyncio

import pytest

from services.progress import keepalive
from services.progress.keepalive import Keepalive

from harness import eventually

INTERVAL_S = 0.2
TIMEOUT_S = 0.2
WAIT_S = 10.0


class FakeSocket:
    """Records its pings; answers them if told to."""

    def __init__(self, keepalive: Keepalive, *, answers: bool = True, closing: bool = False) -> None:
        self.keepalive = keepalive
        self.answers = answers
        self.closing = closing
        self.pings: list[bytes] = []
        self.failed = False
        self.slot = keepalive.start(self)

    def ping(self, payload: bytes) -> bool:
        if self.closing:
            return False
        self.pings.append(payload)
        if self.answers:
            asyncio.get_running_loop().call_soon(self.keepalive.pong, self.slot, payload)
        return True

    def pong_overdue(self) -> None:
        self.failed = True


def new_keepalive() -> Keepalive:
    return Keepalive(asyncio.get_running_loop(), INTERVAL_S, TIMEOUT_S)


async def test_a_socket_that_answers_is_pinged_every_interval_and_never_failed() -> None:
    alive = new_keepalive()
    socket = FakeSocket(alive)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await eventually(lambda: len(socket.pings) >= 3, WAIT_S, "three pings")
    assert loop.time() - started >= 3 * INTERVAL_S
    assert len(set(socket.pings)) == len(socket.pings)  # a fresh payload each time
    assert not socket.failed


async def test_a_socket_that_does_not_answer_is_failed_once_its_pong_is_late_and_pinged_no_more() -> None:
    alive = new_keepalive()
    silent = FakeSocket(alive, answers=False)
    answering = FakeSocket(alive)
    await eventually(lambda: silent.failed, WAIT_S, "the silent socket to be failed")
    await eventually(lambda: len(answering.pings) >= 4, WAIT_S, "the other socket's pings")
    assert len(silent.pings) == 1  # failed on its first ping's deadline, and never pinged again
    assert not answering.failed


async def test_a_late_or_wrong_pong_does_not_count() -> None:
    alive = new_keepalive()
    socket = FakeSocket(alive, answers=False)
    await eventually(lambda: socket.pings, WAIT_S, "a ping")
    alive.pong(socket.slot, b"nope")
    await eventually(lambda: socket.failed, WAIT_S, "the socket to be failed")


async def test_a_stopped_or_closing_socket_is_not_pinged() -> None:
    alive = new_keepalive()
    stopped = FakeSocket(alive)
    Keepalive.stop(stopped.slot)
    closing = FakeSocket(alive, closing=True)
    answering = FakeSocket(alive)
    await eventually(lambda: len(answering.pings) >= 3, WAIT_S, "three pings of the live socket")
    assert stopped.pings == [] and closing.pings == []
    assert not stopped.failed and not closing.failed


async def test_sockets_due_together_are_pinged_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "PINGS_PER_TICK", 5)
    alive = new_keepalive()
    sockets = [FakeSocket(alive) for _ in range(12)]
    counts: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    # Polled far more often than the keepalive ticks (every INTERVAL_S / 4), to see each tick's pings.
    while not counts or counts[-1] < len(sockets):
        assert loop.time() < deadline, f"pinged so far: {counts[-1:]}"
        counts.append(sum(1 for socket in sockets if socket.pings))
        await asyncio.sleep(0.002)
    # 12 sockets due at once: 5 in a tick, 5 more in the next, then the last 2.
    assert {5, 10} <= set(counts)
