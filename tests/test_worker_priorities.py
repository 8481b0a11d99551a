"""Priorities that hold: the weighted choice of level for each free slot, then the real thing under
saturation (real Kafka, PostgreSQL, two worker processes).

The saturation test fills the workers with a backlog of thousands of low-priority jobs, written
straight to the database and the outbox (through the gateway that would take half a minute), then
submits top-priority jobs through the gateway. Times come from the jobs' own `created_at` and
`started_at`, so how often the test polls changes nothing it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from itertools import pairwise
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from sqlalchemy import func, select

from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.events import JobMessage
from conveyor.lifecycle import JobState
from conveyor.models import Job, utcnow
from conveyor.outbox import OutboxRelay
from conveyor.settings import DEFAULT_PRIORITY_WEIGHTS, Settings
from conveyor.topics import HIGHEST_PRIORITY, LOWEST_PRIORITY, PRIORITIES, job_topic
from services.worker.intake import Intake, Pending
from services.worker.priorities import PriorityPicker

from harness import Stack, eventually, write_now

Start = tuple[str, datetime]  # (worker id, started_at)
WEIGHT_OF = dict(zip(PRIORITIES, DEFAULT_PRIORITY_WEIGHTS, strict=True))
ROUND = sum(DEFAULT_PRIORITY_WEIGHTS)  # 31 slots: one full turn of every level at the default weights


def picks(picker: PriorityPicker, ready: Sequence[int], slots: int) -> Counter[int]:
    return Counter(picker.pick(ready) for _ in range(slots))


# --- the policy, without Kafka ------------------------------------------------------------------------


def test_every_level_backlogged_shares_16_8_4_2_1_in_any_31_slots() -> None:
    picker = PriorityPicker()
    sequence = [picker.pick(PRIORITIES) for _ in range(10 * ROUND)]
    for start in range(len(sequence) - ROUND + 1):
        assert Counter(sequence[start : start + ROUND]) == WEIGHT_OF, f"slots {start}..{start + ROUND - 1}"


def test_the_top_level_is_never_kept_waiting_long_by_the_others() -> None:
    picker = PriorityPicker()
    sequence = [picker.pick(PRIORITIES) for _ in range(10 * ROUND)]
    top_slots = [slot for slot, level in enumerate(sequence) if level == HIGHEST_PRIORITY]
    longest_wait = max(later - earlier - 1 for earlier, later in pairwise(top_slots))
    assert longest_wait <= len(PRIORITIES) - 1, "at most one slot for each other level in a row"


@pytest.mark.parametrize("ready", [(1, 5), (2, 3, 5), (3, 4), (1, 2), (4, 5)])
def test_the_levels_with_work_share_by_their_own_weights(ready: tuple[int, ...]) -> None:
    picker = PriorityPicker()
    slots = sum(WEIGHT_OF[level] for level in ready)
    for _ in range(3):
        assert picks(picker, ready, slots) == {level: WEIGHT_OF[level] for level in ready}


def test_the_bottom_level_moves_while_the_levels_above_it_come_and_go() -> None:
    picker = PriorityPicker()
    counts = Counter(picker.pick((1, 2, 5) if slot % 2 else (2, 5)) for slot in range(3000))
    assert counts[5] > 3000 / ROUND, "p5 keeps at least the share it has when every level is busy"


@pytest.mark.parametrize("seed", range(20))
def test_a_top_priority_job_arriving_behind_any_backlog_takes_the_next_slot(seed: int) -> None:
    rng = random.Random(seed)
    picker = PriorityPicker()
    for _ in range(rng.randrange(1, 200)):
        below = [level for level in PRIORITIES if level != HIGHEST_PRIORITY and rng.random() < 0.7]
        picker.pick(below or [LOWEST_PRIORITY])
    assert picker.pick(PRIORITIES) == HIGHEST_PRIORITY


def test_an_idle_level_saves_up_no_credit() -> None:
    picker = PriorityPicker()
    picks(picker, (2, 3, 4, 5), 1000)  # p1 idle all along
    # Were p1 owed for its idle time it would take every slot now; it gets its share, 16 of 31.
    assert picks(picker, PRIORITIES, ROUND)[HIGHEST_PRIORITY] <= WEIGHT_OF[HIGHEST_PRIORITY] + 1


def test_weights_come_from_the_settings() -> None:
    settings = Settings(priority_weights="1,1,1,1,4")
    assert settings.priority_weights == (1, 1, 1, 1, 4)
    picker = PriorityPicker(settings.priority_weights)
    assert picks(picker, PRIORITIES, 3 * 8) == {1: 3, 2: 3, 3: 3, 4: 3, 5: 12}
    picker = PriorityPicker((3, 2, 1, 1, 1))
    assert picks(picker, (1, 2, 3), 6 * 4) == {1: 12, 2: 8, 3: 4}


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError):
        PriorityPicker((16, 8, 4, 2))
    with pytest.raises(ValueError):
        PriorityPicker((16, 8, 4, 2, 0))


def pending(tp: TopicPartition, offset: int, tenant: str) -> Pending:
    message = JobMessage(
        job_id=f"job-{tp.topic}-{offset}", tenant=tenant, type="demo.noop", priority=1, attempt=1
    )
    return Pending(tp, offset, message)


def tenants_of(taken: Sequence[Pending]) -> list[str]:
    return [item.message.tenant for item in taken]


def test_within_a_level_tenants_take_turns_whatever_their_partitions_hold() -> None:
    intake = Intake("pre")
    p3 = [TopicPartition(job_topic("pre", 3), n) for n in range(2)]
    offsets = itertools.count()
    for n in range(50):  # a flood from tenant "bulk" on both partitions, read first
        intake.add(pending(p3[n % 2], next(offsets), "bulk"))
    for tenant in ("a", "b"):
        intake.add(pending(p3[0], next(offsets), tenant))
    assert tenants_of(intake.take(4)) == ["bulk", "a", "b", "bulk"], "one slot each in turn"
    assert tenants_of(intake.take(3)) == ["bulk"] * 3, "the others have nothing waiting"
    intake.add(pending(p3[1], next(offsets), "a"))
    assert tenants_of(intake.take(2)) == ["bulk", "a"], "a tenant that comes back joins the end of the ring"


def test_tenant_weights_set_how_many_slots_a_turn_holds() -> None:
    intake = Intake("pre", tenant_weight=lambda tenant: 3 if tenant == "big" else 1)
    tp = TopicPartition(job_topic("pre", 2), 0)
    for offset in range(40):
        intake.add(pending(tp, offset, "big" if offset < 20 else "small"))
    assert Counter(tenants_of(intake.take(16))) == {"big": 12, "small": 4}


def test_levels_take_their_shares_before_tenants_take_turns() -> None:
    intake = Intake("pre")
    p1, p5 = TopicPartition(job_topic("pre", 1), 0), TopicPartition(job_topic("pre", 5), 0)
    for offset in range(100):
        intake.add(pending(p1, offset, f"t{offset % 3}"))
        intake.add(pending(p5, offset, f"t{offset % 3}"))
    taken = intake.take(WEIGHT_OF[1] + WEIGHT_OF[5])  # p1 and p5 alone share 16:1
    assert Counter(item.tp for item in taken) == {p1: 16, p5: 1}
    assert Counter(tenants_of([item for item in taken if item.tp == p1])) == {"t0": 6, "t1": 5, "t2": 5}


def test_the_read_ahead_is_bounded_per_partition_and_dropped_with_it() -> None:
    intake = Intake("pre", read_ahead=3)
    p4 = [TopicPartition(job_topic("pre", 4), n) for n in range(2)]
    for offset in range(3):
        intake.add(pending(p4[0], offset, "t"))
    intake.add(pending(p4[1], 0, "u"))
    other = TopicPartition("pre.events", 0)
    assert intake.with_room([*p4, other]) == [p4[1]], "a full partition is not read; events are no job topic"
    dropped = intake.drop({p4[0]})
    assert len(dropped) == 3 and len(intake) == 1
    assert intake.with_room(p4) == p4
    assert tenants_of(intake.take(5)) == ["u"]
    assert intake.level_of(p4[0]) == 4
    assert intake.level_of(TopicPartition("elsewhere.jobs.p3", 0)) is None


# --- saturation, on real Kafka and two worker processes ------------------------------------------------

WORKER_CONCURRENCY = 4
WORKERS = 2
LOW_BACKLOG = 2000
TOP_JOBS = 10
TOP_BACKLOG = 400
JOB_SECONDS = 0.15
SUBMIT_INTERVAL_S = 0.2
INSERT_CHUNK = 250
BACKLOG_TENANTS = 8
# A top-priority job should start within a fraction of a second of its submission; this leaves room
# for a loaded 2-core machine.
START_WITHIN_S = 5.0
# The backlog that must still be waiting when the top-priority jobs have started: they jumped it.
STILL_WAITING = 1000


pytestmark = pytest.mark.stack_settings(CONVEYOR_WORKER_CONCURRENCY=WORKER_CONCURRENCY)


async def insert_backlog(db: Database, relay: OutboxRelay, prefix: str, priority: int, count: int) -> None:
    """`count` queued demo.sleep jobs, written as the gateway writes them and published at once. They
    belong to BACKLOG_TENANTS tenants in turn."""
    for first in range(0, count, INSERT_CHUNK):
        jobs = [
            NewJob(
                tenant=f"bulk-{n % BACKLOG_TENANTS}",
                type="demo.sleep",
                payload={"seconds": JOB_SECONDS, "steps": 1},
                priority=priority,
                max_attempts=1,
            )
            for n in range(first, min(first + INSERT_CHUNK, count))
        ]
        written = await write_now(db, prefix, *jobs)
        assert await relay.publish(written.outbox)


async def count_jobs(db: Database, priority: int, *statuses: JobState) -> int:
    async with db.reading() as session:
        query = select(func.count()).where(Job.priority == priority, Job.status.in_(statuses))
        return int(await session.scalar(query) or 0)


async def starts(db: Database, priority: int, created_after: datetime | None = None) -> list[Start]:
    """(worker, started_at) of the level's jobs that have started, earliest first."""
    async with db.reading() as session:
        query = select(Job.worker_id, Job.started_at).where(
            Job.priority == priority, Job.started_at.is_not(None)
        )
        if created_after is not None:
            query = query.where(Job.created_at >= created_after)
        rows = (await session.execute(query)).all()
    return sorted(((worker or "", started) for worker, started in rows), key=lambda row: row[1])


def starts_while_backlogged(top: list[Start], low: list[Start]) -> tuple[int, int]:
    """(top starts, low starts) on each worker between its first and last start of `top`, summed: the
    time that worker had the top backlog. The backlog's partitions are spread unevenly over the workers,
    so one runs out earlier than another and then, rightly, gives all its slots to the low level."""
    top_count = low_count = 0
    for worker in {worker for worker, _ in top}:
        times = [started for who, started in top if who == worker]
        top_count += len(times)
        low_count += sum(1 for who, started in low if who == worker and times[0] <= started <= times[-1])
    return top_count, low_count


async def started_jobs(db: Database, ids: list[str]) -> list[Job] | None:
    """The jobs, once every one of them has started; None until then."""
    async with db.reading() as session:
        jobs = list((await session.scalars(select(Job).where(Job.id.in_(ids)))).all())
    return jobs if len(jobs) == len(ids) and all(job.started_at for job in jobs) else None


async def submit_top_priority(client: httpx.AsyncClient) -> dict[str, Any]:
    body = {"type": "demo.sleep", "payload": {"seconds": JOB_SECONDS}, "priority": HIGHEST_PRIORITY}
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


@pytest.mark.parametrize("database_kind", ["postgresql"], indirect=True)
async def test_top_priority_jumps_a_saturating_backlog_and_the_bottom_still_moves(
    stack: Stack, database_url: str
) -> None:
    stack.start("worker-2", "worker")
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    db = Database(database_url)
    relay = OutboxRelay(db, stack.env["CONVEYOR_KAFKA_BOOTSTRAP"])
    await relay.start()
    try:
        await eventually(lambda: "worker.assigned" in stack.log("worker-2"), 60, "worker-2 to join")
        await insert_backlog(db, relay, prefix, LOWEST_PRIORITY, LOW_BACKLOG)
        await eventually(
            lambda: count_jobs(db, LOWEST_PRIORITY, JobState.SUCCEEDED), 60, "the backlog to be worked on"
        )

        async def saturated() -> bool:
            return await count_jobs(db, LOWEST_PRIORITY, JobState.RUNNING) >= WORKERS * WORKER_CONCURRENCY

        await eventually(saturated, 30, "every slot to be busy with the backlog")

        # Top-priority jobs, spread out so that each arrives on its own behind the backlog.
        async with stack.client() as client:
            top = []
            for _ in range(TOP_JOBS):
                top.append(await submit_top_priority(client))
                await asyncio.sleep(SUBMIT_INTERVAL_S)
        jobs = await eventually(
            lambda: started_jobs(db, [job["id"] for job in top]), 60, "the p1 jobs to start"
        )
        still_waiting = await count_jobs(db, LOWEST_PRIORITY, JobState.QUEUED)

        waits = [(job.started_at - job.created_at).total_seconds() for job in jobs]
        assert max(waits) <= START_WITHIN_S, f"queue waits of the p1 jobs: {sorted(waits)}"
        assert still_waiting >= STILL_WAITING, "the p1 jobs were started ahead of the backlog"

        # A top-priority backlog now: it gets most slots, the bottom level still gets its share.
        since = utcnow()
        await insert_backlog(db, relay, prefix, HIGHEST_PRIORITY, TOP_BACKLOG)

        async def backlog_started() -> list[Start] | None:
            started = await starts(db, HIGHEST_PRIORITY, created_after=since)
            return started if len(started) == TOP_BACKLOG else None

        top_starts = await eventually(backlog_started, 90, "the p1 backlog to start")
        low_starts = await starts(db, LOWEST_PRIORITY)
        assert await count_jobs(db, LOWEST_PRIORITY, JobState.QUEUED) > 0, "p5 stayed backlogged throughout"
    finally:
        await relay.stop()
        await db.close()

    # p1 and p5 backlogged share 16:1: p5 gets 1 slot in 17, about 25 beside the 400 of p1.
    top_count, low_count = starts_while_backlogged(top_starts, low_starts)
    share = low_count / (top_count + low_count)
    assert 1 / (2 * 17) <= share <= 3 / 17, f"p5 got {low_count} slots beside {top_count} of p1"
