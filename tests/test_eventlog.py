"""A job's event history, on SQLite and PostgreSQL: written with every announced change, read back in
order for resumes (pruning: tests/test_pruning.py)."""

from __future__ import annotations

from conveyor import changes
from conveyor.changes import ChangeResult, NewJob
from conveyor.database import Database
from conveyor.eventlog import events_between
from conveyor.models import JobRecord

from harness import write_now

PREFIX = "history-test"


async def written(db: Database, change: changes.Change) -> JobRecord:
    [[result]] = (await write_now(db, PREFIX, change)).results
    assert isinstance(result, ChangeResult) and result.job is not None, result
    return result.job


async def finished_job(db: Database) -> JobRecord:
    """A job taken through queued, running, two progress reports and succeeded: events 1 to 5."""
    job = await written(db, NewJob(tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1))
    claimed = await written(db, changes.claim(job.id, "w1", lease_s=30))
    for percent in (40.0, 80.0):
        await written(db, changes.progress(job.id, 1, percent, f"at {percent}"))
    return await written(db, changes.complete(claimed, {"ok": True}))


async def test_every_announced_change_is_in_the_history_in_order(db: Database) -> None:
    job = await finished_job(db)
    async with db.reading() as session:
        events = await session.run_sync(events_between, job.id, 0, job.last_seq, tenant="t")
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
        middle = await session.run_sync(events_between, job.id, 2, 4, tenant="t")
        assert [e.seq for e in middle or []] == [3, 4]
        assert await session.run_sync(events_between, job.id, 5, 5, tenant="t") == []


async def test_another_tenants_history_reads_as_pruned_not_as_its_events(db: Database) -> None:
    job = await finished_job(db)
    async with db.reading() as session:
        assert await session.run_sync(events_between, job.id, 0, job.last_seq, tenant="other") is None
        assert await session.run_sync(events_between, job.id, 0, job.last_seq, tenant="t") is not None
