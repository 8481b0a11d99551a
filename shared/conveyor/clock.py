"""Two clocks. The process's (`utcnow`) stamps what one process writes for people to read: created,
started and finished times. The database's (`database_now`) is the one every process compares against
for leases, worker heartbeats, due times and ages, because those comparisons are made by one process about
another's writes, and the processes may run on hosts whose clocks disagree. A reaper 10 s ahead of a
worker would otherwise take live leases, and a relay ahead of the others sweep their fresh outbox rows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, func, select

# The database's clock on PostgreSQL: the time its transaction started, the same for every statement of it.
_DATABASE_NOW = select(func.now())

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
    """Now by the database's clock, read in the caller's transaction. SQLite runs inside the process
    that opens it, on the one host every process using that file shares, so its clock is the host's."""
    if connection.dialect.name == "sqlite":
        return datetime.now(UTC)
    now: datetime = connection.execute(_DATABASE_NOW).scalar_one()
    return now.astimezone(UTC) if now.tzinfo is not None else now.replace(tzinfo=UTC)
