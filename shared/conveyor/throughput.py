"""A tenant's finished jobs per minute over the last quarter hour (the dashboard's chart), in one query.

Like `conveyor.jobstats`' last minute, it reads the partial `ix_jobs_finished_at` (every tenant's jobs
of the window, filtered to this one's), never the tenant's whole history, and counts each minute with
a conditional sum, so the grouping is the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, case, func, select

from conveyor.models import JOBS

# The chart's window, in whole minutes, oldest first.
CHART_MINUTES = 15
MINUTE = timedelta(minutes=1)


def finished_per_minute(
    connection: Connection, tenant: str, now: datetime, minutes: int = CHART_MINUTES
) -> list[int]:
    """The jobs of `tenant` that finished (any outcome) in each of the `minutes` minutes before `now`,
    oldest minute first: item i counts `[now - (minutes - i) min, now - (minutes - i - 1) min)`."""
    starts = [now - MINUTE * (minutes - index) for index in range(minutes)]
    counts = [func.coalesce(func.sum(case((_within(start), 1), else_=0)), 0) for start in starts]
    # `tenant || ''`: keeps the tenant off ix_jobs_tenant_status, as in conveyor.jobstats.
    row = connection.execute(
        select(*counts).where(JOBS.c.finished_at >= starts[0], JOBS.c.tenant.concat("") == tenant)
    ).one()
    return [int(value) for value in row]


def _within(start: datetime) -> ColumnElement[bool]:
    # Half-open, so a job finished on a minute's boundary is counted once.
    return and_(JOBS.c.finished_at >= start, JOBS.c.finished_at < start + MINUTE)
