"""Python's garbage collector, tuned for a long-running service.

A full collection walks every object the process holds, and a service holds hundreds of thousands
from its start alone (modules, SQLAlchemy's compiled statements, FastAPI's routes, pydantic's
validators), none of which will ever be garbage. Walking them costs tens of milliseconds, paid by
whichever request or job is running at that moment: the tail of every latency. So once a service has
started, what it holds is frozen (`gc.freeze()`: left out of every later collection), and the first
generation is collected less often, each collection still cheap.

A service whose heap grows with its connections (the progress service: each socket's objects live as
long as the socket) also waits longer between full collections (`old_threshold`). Python makes one
every 10 collections of the middle generation while the heap grows by a quarter, so while 10,000
sockets connect it walked all of them again and again: full collections of 60 to 860 ms, ~1 s of the
~9 s of CPU connecting takes. Garbage that reaches the oldest generation, a closed socket's cycles
(~28 objects each), then waits a little longer for the full collection that frees it.
"""

from __future__ import annotations

import gc

# Allocations (net of deallocations) between collections of the youngest generation; Python's default
# is 700. The middle generation keeps Python's ratio.
YOUNG_THRESHOLD = 10_000
# Collections of the middle generation between full ones, for a service with a growing heap (the
# progress service); Python's default, 10, for the others.
GROWING_HEAP_OLD_THRESHOLD = 100


def started(old_threshold: int | None = None) -> None:
    """Call once the service has started: everything it holds now is kept out of later collections.
    `old_threshold`: the collections of the middle generation between full ones (Python's if None)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old if old_threshold is None else old_threshold)
