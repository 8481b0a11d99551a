"""A job's event history, on SQLite and PostgreSQL: written with every announced change, read back in
order for resumes, and pruned after the job finished."""

from __future__ import annotations

from datetime import timedelta

from conveyor.database import Database
from conveyor.eventlog import events_between, prune_event_history
from conveyor.jobstore import announce, announce_state, claim_job, complete_job, insert_job, record_progress
from conveyor.models import Job, utcnow

PREFIX = "history-test"


async def finished_job(db: Database) -> Job:
    """A job taken through queued, running, two progress reports and succeeded: events 1 to 5."""
    async with db.session() as session:
        job = await insert_job(session, tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1)
        announce(session, PREFIX, job, "state")
    async with db.session() as session:
        claimed = await claim_job(session, job.id, "w1", lease_s=30)
        assert claimed is not None
        announce(session, PREFIX, claimed, "state")
    for percent in (40.0, 80.0):
        async with db.session() as session:
            reported = await record_progress(session, job.id, 1, percent, f"at {percent}")
            assert reported is not None
            announce(session, PREFIX, reported, "progress")
    async with db.session() as session:
        done = await complete_job(session, job.id, 1, {"ok": True})
        assert done is not None
        announce_state(session, PREFIX, done)
    return done


async def test_every_announced_change_is_in_the_history_in_order(db: Database) -> None:
    job = await finished_job(db)
    async with db.reading() as session:
        events = await events_between(session, job.id, 0, job.last_seq)
    assert events is not None
    assert [(e.seq, e.type, e.status) for e in events] == [
        (1, "state", "queued"),
        (2, "state", "running"),
        (3, "progress", "running"),
        (4, "progress", "running"),
        (5, "state", "succeeded"),
    ]
    assert events[3].progress.percent == 80.0 and events[-1].result == {"ok": True}
    async with db.reading() as session:
        assert [e.seq for e in await events_between(session, job.id, 2, 4) or []] == [3, 4]
        assert await events_between(session, job.id, 5, 5) == []


async def test_history_of_jobs_finished_long_ago_is_pruned(db: Database) -> None:
    old = await finished_job(db)
    recent = await finished_job(db)
    async with db.session() as session:
        stored = await session.get(Job, old.id)
        assert stored is not None
        stored.finished_at = utcnow() - timedelta(days=30)
    async with db.session() as session:
        deleted = await prune_event_history(session, utcnow() - timedelta(days=7))
    assert deleted == 5
    async with db.reading() as session:
        assert await events_between(session, old.id, 0, old.last_seq) is None  # pruned: not a partial list
        assert len(await events_between(session, recent.id, 0, recent.last_seq) or []) == 5
