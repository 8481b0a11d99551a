"""A tenant's queue at a glance (`GET /v1/stats`): its unfinished jobs counted by status and priority,
the jobs it finished in the last minute, and since when its oldest queued job has waited.

One statement, two grouped halves, each on an index: the unfinished jobs through
`ix_jobs_tenant_status` (the tenant's scheduled, queued and running rows only, never its finished
history, which may be millions of rows), and the recently finished through the partial
`ix_jobs_finished_at` (every tenant's jobs of the last minute, filtered to this one's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, func, literal, null, select, union_all

from conveyor.lifecycle import TERMINAL_STATES, JobState
from conveyor.models import JOBS
from conveyor.topics import HIGHEST_PRIORITY, LOWEST_PRIORITY

# "Finished per minute": the jobs that finished in this window before the moment asked about.
FINISHED_WINDOW_S = 60.0
UNFINISHED_STATES = (JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING)
PRIORITIES = range(HIGHEST_PRIORITY, LOWEST_PRIORITY + 1)


@dataclass
class QueueStats:
    at: datetime
    # (status, priority) -> jobs, for the unfinished statuses.
    unfinished: dict[tuple[JobState, int], int] = field(default_factory=dict)
    # status -> jobs finished in the last FINISHED_WINDOW_S.
    finished: dict[JobState, int] = field(default_factory=dict)
    # When the job queued longest ago entered `queued` (a queued job's last change is that one).
    oldest_queued_at: datetime | None = None

    def document(self) -> dict[str, object]:
        """The JSON body of `GET /v1/stats`: every priority and status present, zeros included."""

        def counts(priority: int | None) -> dict[str, int]:
            return {
                state.value: sum(
                    jobs
                    for (status, level), jobs in self.unfinished.items()
                    if status is state and (priority is None or level == priority)
                )
                for state in UNFINISHED_STATES
            }

        return {
            "at": _iso(self.at),
            "priorities": {str(priority): counts(priority) for priority in PRIORITIES},
            "totals": counts(None),
            "finished_last_minute": {
                state.value: self.finished.get(state, 0) for state in sorted(TERMINAL_STATES)
            },
            "oldest_queued_at": _iso(self.oldest_queued_at),
        }


def queue_stats(connection: Connection, tenant: str, now: datetime) -> QueueStats:
    since = now - timedelta(seconds=FINISHED_WINDOW_S)
    unfinished = (
        select(
            literal(0).label("part"),
            JOBS.c.status,
            JOBS.c.priority,
            func.count().label("jobs"),
            func.min(JOBS.c.updated_at).label("oldest"),
        )
        .where(JOBS.c.tenant == tenant, JOBS.c.status.in_(UNFINISHED_STATES))
        .group_by(JOBS.c.status, JOBS.c.priority)
    )
    finished = (
        select(
            literal(1).label("part"),
            JOBS.c.status,
            JOBS.c.priority,
            func.count().label("jobs"),
            null().label("oldest"),
        )
        # `tenant || ''`, not `tenant`: the same test, but one no index answers, so that the planner
        # takes the last minute from ix_jobs_finished_at rather than the tenant's whole history from
        # ix_jobs_tenant_status (SQLite's documented way to keep a term off an index; SQLite has no hints).
        .where(JOBS.c.finished_at >= since, JOBS.c.tenant.concat("") == tenant)
        .group_by(JOBS.c.status, JOBS.c.priority)
    )
    stats = QueueStats(at=now)
    for row in connection.execute(union_all(unfinished, finished)):
        status = JobState(row.status)
        if row.part == 0:
            stats.unfinished[(status, row.priority)] = row.jobs
            if status is JobState.QUEUED and row.oldest is not None:
                oldest = _aware(row.oldest)
                if stats.oldest_queued_at is None or oldest < stats.oldest_queued_at:
                    stats.oldest_queued_at = oldest
        elif status in TERMINAL_STATES:  # a retried job keeps no finished_at, but be sure
            stats.finished[status] = stats.finished.get(status, 0) + row.jobs
    return stats


def _aware(moment: datetime | str) -> datetime:
    """A time from the union's first half: typed on PostgreSQL, text in SQLite's format on SQLite."""
    value = datetime.fromisoformat(moment) if isinstance(moment, str) else moment
    return value.replace(tzinfo=value.tzinfo or UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
