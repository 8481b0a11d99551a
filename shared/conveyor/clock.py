"""Two clocks. The process's (`utcnow`) stamps what one process writes for people to read: created,
started and finished times. The database's (`database_now`) is the one every process compares against
for leases, worker heartbeats, due times and ages, because those comparisons are made by one process about
another's writes, and the processes may run on hosts whose clocks disagree. A reaper 10 s ahead of a
worker would otherwise take live leases, and a relay ahead of the others sweep their fresh outbox rows.
"""

from __future__ import annotations

import time
import weakref
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, func, select

# The PostgreSQL server's clock as it reads now (not `now()`, the time its transaction started).
_DATABASE_CLOCK = select(func.clock_timestamp())
# How often the offset to the server's clock is measured again: a host whose clock is stepped is
# followed within this long.
OFFSET_REFRESH_S = 10.0
# By engine (one per database a process opens): (when it was measured, on the monotonic clock; the
# offset). Weak, so an engine disposed of takes its offset with it.
_offsets: weakref.WeakKeyDictionary[Engine, tuple[float, timedelta]] = weakref.WeakKeyDictionary()

_skew = timedelta(0)


def utcnow() -> datetime:
    """This process's idea of now (UTC)."""
    return datetime.now(UTC) + _skew


def skew_process_clock(seconds: float) -> None:
    """Shift this process's idea of now (`CONVEYOR_CLOCK_SKEW_S`): for tests of hosts whose clocks
    disagree. The database's clock does not move with it."""
    global _skew
    _skew = timedelta(seconds=seconds)


def database_now(connection: Connection) -> datetime:
    """Now by the database's clock. SQLite runs inside the process that opens it, on the one host every
    process using that file shares, so its clock is the host's. PostgreSQL's is this host's clock plus
    the offset to the server's, measured with a round trip at most every OFFSET_REFRESH_S: the write
    path asks for the time in every transaction, and a round trip each would cost it more than the
    offset's error (half a round trip, well under a millisecond) matters to a lease of seconds."""
    if connection.dialect.name == "sqlite":
        return datetime.now(UTC)
    engine = connection.engine
    measured = _offsets.get(engine)
    if measured is None or time.monotonic() - measured[0] > OFFSET_REFRESH_S:
        measured = _offsets[engine] = (time.monotonic(), _measure_offset(connection))
    return datetime.now(UTC) + measured[1]


def _measure_offset(connection: Connection) -> timedelta:
    """The server's clock minus this host's, taken at the middle of the round trip."""
    sent = datetime.now(UTC)
    server: datetime = connection.execute(_DATABASE_CLOCK).scalar_one()
    received = datetime.now(UTC)
    server = server.astimezone(UTC) if server.tzinfo is not None else server.replace(tzinfo=UTC)
    return server - (sent + (received - sent) / 2)
