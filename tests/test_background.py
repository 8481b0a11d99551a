"""conveyor.background, in-process: the backoff's arithmetic, a task's start and stop, and the loops' waits.

The loops' sleeps are recorded instead of slept (a fake `asyncio.sleep`), so each test knows exactly
which waits were asked for, and runs in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from conveyor import background
from conveyor.background import BackgroundTask, exponential_delay, retry_every, run_every

WITHIN_S = 5.0
_real_sleep = asyncio.sleep


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The delays the loops ask for, in order; each sleep only yields to the event loop."""
    asked: list[float] = []

    async def recorded(delay: float) -> None:
        asked.append(delay)
        await _real_sleep(0)

    monkeypatch.setattr(background.asyncio, "sleep", recorded)
    yield asked


def test_the_delay_doubles_from_the_base_up_to_the_cap() -> None:
    assert [exponential_delay(n, 0.5, 10.0) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert exponential_delay(10_000, 1.0, 30.0) == 30.0, "no overflow however long it fails"


async def test_a_task_starts_once_and_stop_waits_for_it_to_end() -> None:
    started = asyncio.Event()
    runs = 0

    async def body() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.Event().wait()  # until cancelled

    task = BackgroundTask("forever", body)
    assert not task.running
    task.start()
    task.start()
    await asyncio.wait_for(started.wait(), WITHIN_S)
    assert task.running
    assert await task.stop() is False, "cancelled, not ended by itself"
    assert not task.running
    assert runs == 1
    assert await task.stop() is True, "stopping again, or a task never started, is fine"


async def test_stop_gives_a_task_told_to_finish_its_grace() -> None:
    finish = asyncio.Event()
    finished = False

    async def body() -> None:
        nonlocal finished
        await finish.wait()
        finished = True

    task = BackgroundTask("finishing", body)
    task.start()
    finish.set()
    assert await task.stop(grace_s=WITHIN_S) is True
    assert finished


async def test_a_failed_task_stops_quietly() -> None:
    async def body() -> None:
        raise RuntimeError("boom")

    task = BackgroundTask("failing", body)
    task.start()
    await _until(lambda: not task.running)
    assert await task.stop() is True


async def test_run_every_keeps_its_interval_and_outlives_failed_rounds(
    sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    logged: list[tuple[str, int]] = []
    monkeypatch.setattr(background, "log", _Recorder(logged))
    outcomes: list[Exception | None] = [RuntimeError("one"), None, RuntimeError("two"), None]
    rounds = 0

    async def action() -> None:
        nonlocal rounds
        outcome = outcomes[rounds % len(outcomes)]
        rounds += 1
        if outcome is not None:
            raise outcome

    task = BackgroundTask("chore", lambda: run_every(2.0, action, failure_event="chore.failed"))
    task.start()
    await _until(lambda: rounds >= len(outcomes))
    await task.stop()
    assert sleeps[:4] == [2.0, 2.0, 2.0, 2.0], "without a cap a failure never delays the next round"
    assert logged[:2] == [("chore.failed", 1), ("chore.failed", 1)], "a good round resets the count"


async def test_run_every_backs_off_while_rounds_fail_up_to_its_cap(sleeps: list[float]) -> None:
    failures_left = 4
    recovered = asyncio.Event()

    async def action() -> None:
        nonlocal failures_left
        if failures_left:
            failures_left -= 1
            raise OSError("away")
        recovered.set()

    task = BackgroundTask(
        "chore", lambda: run_every(1.0, action, failure_event="chore.failed", failure_cap_s=3.0)
    )
    task.start()
    await asyncio.wait_for(recovered.wait(), WITHIN_S)
    await _until(lambda: len(sleeps) >= 6)
    await task.stop()
    assert sleeps[:6] == [1.0, 1.0, 2.0, 3.0, 3.0, 1.0], "doubling up to the cap, then the interval again"


async def test_retry_every_tries_until_an_attempt_succeeds(sleeps: list[float]) -> None:
    attempts = 0

    async def attempt() -> bool:
        nonlocal attempts
        attempts += 1
        return attempts == 3

    await asyncio.wait_for(retry_every(2.0, attempt), WITHIN_S)
    assert attempts == 3
    assert sleeps == [2.0, 2.0, 2.0]


class _Recorder:
    """Stands in for the module's logger: keeps each failure's event name and count."""

    def __init__(self, logged: list[tuple[str, int]]) -> None:
        self._logged = logged

    def exception(self, event: str, *, failures: int) -> None:
        self._logged.append((event, failures))


async def _until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (with the real sleep, which the `sleeps` fixture leaves alone) until it holds."""
    deadline = asyncio.get_running_loop().time() + WITHIN_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await _real_sleep(0.01)
