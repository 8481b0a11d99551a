"""Python's garbage collector, tuned for a long-running service.

A full collection walks every object the process holds, and a service holds hundreds of thousands
from its start alone (modules, SQLAlchemy's compiled statements, FastAPI's routes, pydantic's
validators), none of which will ever be garbage. Walking them costs tens of milliseconds, paid by
whichever request or job is running at that moment: the tail of every latency. So once a service has
started, what it holds is frozen (`gc.freeze()`: left out of every later collection), and the first
generation is collected less often, each collection still cheap.
"""

from __future__ import annotations

import gc

# Allocations (net of deallocations) between collections of the youngest generation; Python's default
# is 700. The older generations keep Python's own ratios.
YOUNG_THRESHOLD = 10_000


def started() -> None:
    """Call once the service has started: everything it holds now is kept out of later collections."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
