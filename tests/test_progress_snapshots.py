"""Snapshot reads in batches: one query for everyone asking while a read is under way, each asker
answered with its own tenant's job as it was after it asked."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection

from conveyor import changes
from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord
from services.progress import snapshots as snapshots_module
from services.progress.snapshots import SnapshotReads

from harness import write_now

PREFIX = "snapshots-test"


class CountedReads:
    """The database's own reads, counted (with the loop's time at each start); `hold` keeps the next
    read's answer back until released."""

    def __init__(self, db: Database) -> None:
        self._read = db.read
        self.started_at: list[float] = []
        self.hold: asyncio.Event | None = None
        self.read_once = asyncio.Event()  # a read has been done (its answer maybe held back)
        db.read = self  # type: ignore[method-assign]

    @property
    def count(self) -> int:
        return len(self.started_at)

    async def __call__(self, work: Callable[[Connection], Any]) -> Any:
        self.started_at.append(asyncio.get_running_loop().time())
        hold, self.hold = self.hold, None
        result = await self._read(work)
        self.read_once.set()
        if hold is not None:
            await hold.wait()
        return result


async def new_job(db: Database, tenant: str) -> JobRecord:
    change = NewJob(tenant=tenant, type="demo.echo", payload={}, priority=3, max_attempts=2)
    [[result]] = (await write_now(db, PREFIX, change)).results
    assert result.job is not None
    return result.job


async def test_concurrent_askers_share_one_query_and_each_gets_its_own_tenants_job(db: Database) -> None:
    jobs = [await new_job(db, "t") for _ in range(30)] + [await new_job(db, "u") for _ in range(10)]
    reads = CountedReads(db)
    snapshots = SnapshotReads(db)
    askers = [(job.tenant, job.id) for job in jobs]
    askers += [("u", jobs[0].id), ("t", "not-a-job-id"), ("t", "00000000-0000-4000-8000-000000000000")]
    answers = await asyncio.gather(*(snapshots.job(tenant, job_id) for tenant, job_id in askers))
    assert reads.count == 1
    assert [answer.id if answer else None for answer in answers[:40]] == [job.id for job in jobs]
    for answer, job in zip(answers[:40], jobs, strict=True):
        assert answer is not None and answer.tenant == job.tenant
    assert answers[40:] == [None, None, None]  # another tenant's job, a bad id, an unknown id


async def test_an_asker_during_a_read_gets_a_read_that_starts_after_it_asked(db: Database) -> None:
    job = await new_job(db, "t")
    reads = CountedReads(db)
    snapshots = SnapshotReads(db)
    reads.hold = asyncio.Event()
    held = reads.hold
    first = asyncio.create_task(snapshots.job("t", job.id))
    await asyncio.wait_for(reads.read_once.wait(), 10)  # the first read is done, its answer held back
    [[claimed]] = (await write_now(db, PREFIX, changes.claim(job.id, "w1", lease_s=30))).results
    assert claimed.written
    second = asyncio.create_task(snapshots.job("t", job.id))
    third = asyncio.create_task(snapshots.job("t", job.id))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not second.done() and reads.count == 1  # waits for the next read, not the one under way
    held.set()
    before, after, also_after = await asyncio.gather(first, second, third)
    assert before is not None and before.status is JobState.QUEUED
    assert after is not None and after.status is JobState.RUNNING
    assert also_after == after
    assert reads.count == 2


async def test_a_failed_read_fails_its_askers_and_the_next_read_is_fresh(db: Database) -> None:
    job = await new_job(db, "t")
    snapshots = SnapshotReads(db)
    real_read = db.read

    async def broken(work: Callable[[Connection], Any]) -> Any:
        raise OSError("database unreachable")

    db.read = broken  # type: ignore[method-assign]
    results = await asyncio.gather(*(snapshots.job("t", job.id) for _ in range(3)), return_exceptions=True)
    assert [type(result) for result in results] == [OSError] * 3
    db.read = real_read  # type: ignore[method-assign]
    again = await snapshots.job("t", job.id)
    assert again is not None and again.id == job.id


async def test_an_asker_that_goes_away_does_not_cancel_the_read_of_the_others(db: Database) -> None:
    job = await new_job(db, "t")
    snapshots = SnapshotReads(db)
    leaving = asyncio.create_task(snapshots.job("t", job.id))
    staying = asyncio.create_task(snapshots.job("t", job.id))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    answer = await staying
    assert answer is not None and answer.id == job.id


async def test_resumes_share_one_read_each_with_the_events_after_its_own_seq(db: Database) -> None:
    job = await new_job(db, "t")
    [[claimed]] = (await write_now(db, PREFIX, changes.claim(job.id, "w1", lease_s=30))).results
    assert claimed.written
    for done in (1, 2):
        [[reported]] = (await write_now(db, PREFIX, changes.progress(job.id, 1, 50.0 * done, "half"))).results
        assert reported.written
    other = await new_job(db, "u")
    reads = CountedReads(db)
    snapshots = SnapshotReads(db)
    asked = [("t", job.id, 1), ("t", job.id, 1), ("t", job.id, 3), ("t", job.id, 4), ("t", other.id, 0)]
    answers = await asyncio.gather(*(snapshots.resume(*key) for key in asked))
    assert reads.count == 1
    replays = [[event.seq for event in events] if events is not None else None for _, events in answers]
    assert replays == [[2, 3, 4], [2, 3, 4], [4], None, None]  # 4 is the last seq: nothing to replay
    assert all(found is not None and found.last_seq == 4 for found, _ in answers[:4])
    assert answers[4] == (None, None)  # another tenant's job: no job, no history


async def test_reads_start_at_most_every_interval_and_each_answers_everyone_who_asked_meanwhile(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the 10 ms of the default: a first read slower than the interval (a loaded machine)
    # would leave no pause for the flood below to gather in.
    interval_s = 0.5
    monkeypatch.setattr(snapshots_module, "READ_INTERVAL_S", interval_s)
    job = await new_job(db, "t")
    reads = CountedReads(db)
    snapshots = SnapshotReads(db)
    loop = asyncio.get_running_loop()
    asked_at = loop.time()
    first = await snapshots.job("t", job.id)  # nothing read lately: read at once
    assert first is not None and reads.count == 1
    assert reads.started_at[0] - asked_at < interval_s
    # A flood right after that read: five askers, one per turn of the loop.
    answers = []
    for _ in range(5):
        answers.append(asyncio.create_task(snapshots.job("t", job.id)))
        await asyncio.sleep(0)
    assert all(answer is not None for answer in await asyncio.gather(*answers))
    assert reads.count == 2  # the five in one read
    assert reads.started_at[1] - reads.started_at[0] >= interval_s
