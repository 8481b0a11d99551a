"""Stop requests (SIGTERM, Ctrl-C) for commands that start servers in process sessions of their own.

Such a server does not get the terminal's Ctrl-C, and the default SIGTERM would end the command without
running its `finally`: the server would be left behind. So the command turns both signals into an
exception at once, before it starts anything, and stops its servers while it unwinds.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


def raise_on_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)


def ignore_stop_signals() -> None:
    """While stopping: a second signal must not cut the stop short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def wait_for_stop() -> None:
    """Block until a stop signal arrives (after `raise_on_stop_signals`)."""
    try:
        while True:
            signal.pause()
    except StopRequested:
        return
