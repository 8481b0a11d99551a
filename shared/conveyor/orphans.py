"""A child process that must not outlive its parent: a service's helper processes, which are no use
without the process that supervises them (and which nobody would stop once it is gone)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

# prctl(2): deliver this signal to the calling process when its parent dies.
PR_SET_PDEATHSIG = 1
# Elsewhere than Linux, how often the parent is looked for.
PARENT_CHECK_INTERVAL_S = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid`, its parent, dies, even by SIGKILL: at once on Linux (the
    kernel sends SIGKILL), within PARENT_CHECK_INTERVAL_S elsewhere. A parent already gone ends it now."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch, args=(parent_pid,), name="parent-watch", daemon=True).start()
    # The parent may have died before the request above: this process was adopted already.
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL_S)
    os._exit(1)
