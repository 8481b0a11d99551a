"""The workers' consumer group under stress, on the real broker: members joining while jobs run, jobs
longer than max.poll.interval.ms, and a worker killed while jobs of one partition finish out of order.

What must hold each time: no job is lost, none runs twice (each attempt is in the job's event history,
and the attempts of a job never overlap), a worker that keeps running stays in its group, and no
partition's committed offset passes a job that has not finished.

Job placement is chosen, not left to chance: a job message's Kafka key is its job id
(`conveyor.topics.job_key`), so this module gives each job an id that hashes to the partition it wants
and writes it as the gateway writes a submission (the job, its event and its message in one
transaction, then published). A job at priority p lands on partition (topic p, that partition).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2
from conftest import TEST_LEASE_S

from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.events import JobEvent, JobMessage
from conveyor.jobstore import load_job
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord
from conveyor.outbox import OutboxRelay
from conveyor.settings import DEFAULT_MAX_ATTEMPTS
from conveyor.topics import job_topic, worker_group

from harness import (
    TENANT_A,
    Stack,
    assignments,
    event_history,
    eventually,
    group_members,
    sleep_job,
    worker_events,
    write_now,
)

PARTITIONS = 3  # CONVEYOR_PARTITIONS of the test deployments
PRIORITIES = range(1, 6)
JOB_TIMEOUT_S = 60
# Starting a worker process, and its joining the group, on a loaded 2-core machine.
JOIN_TIMEOUT_S = 45
TERMINAL = {"succeeded", "failed", "canceled"}


def partition_of(key: str, partitions: int = PARTITIONS) -> int:
    """The partition the producer's default partitioner picks for `key` (murmur2, as the Java client)."""
    return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)


def job_id_on(partition: int) -> str:
    """A fresh job id whose job message lands on `partition`."""
    while partition_of(job_id := str(uuid.uuid4())) != partition:
        pass
    return job_id


@pytest.fixture
def worker_env() -> dict[str, str]:
    """Settings a test's services get beyond the module's; tests override it with parametrize."""
    return {}


@pytest.fixture
def stack_env(stack_env: dict[str, str], worker_env: dict[str, str]) -> dict[str, str]:
    assert stack_env["CONVEYOR_PARTITIONS"] == str(PARTITIONS)
    return {
        **stack_env,
        "CONVEYOR_LOG_JSON": "true",
        # `job.started` and `job.recorded`, the lines every job logs, are at DEBUG.
        "CONVEYOR_LOG_LEVEL": "DEBUG",
        "CONVEYOR_WORKER_CONCURRENCY": "4",
        **worker_env,
    }


# --- Submitting ---


async def place(stack: Stack, partition: int, priority: int, body: dict[str, Any]) -> str:
    """Submit a job that lands on partition `partition` of priority `priority`'s topic."""
    job = NewJob(
        tenant=TENANT_A,
        type=body["type"],
        payload=body["payload"],
        priority=priority,
        max_attempts=DEFAULT_MAX_ATTEMPTS,
        id=job_id_on(partition),
    )
    db = Database(stack.env["CONVEYOR_DATABASE_URL"])
    relay = OutboxRelay(db, stack.env["CONVEYOR_KAFKA_BOOTSTRAP"])
    try:
        written = await write_now(db, stack.env["CONVEYOR_TOPIC_PREFIX"], job)
        assert written.results[0][0].written
        assert await relay.publish(written.outbox), "published"
    finally:
        await relay.stop()
        await db.close()
    return job.id


# --- Reading the database ---


class Jobs:
    """The test's view of the deployment's database: job rows and event histories."""

    def __init__(self, database_url: str) -> None:
        self.db = Database(database_url)

    async def close(self) -> None:
        await self.db.close()

    async def job(self, job_id: str) -> JobRecord:
        async with self.db.reading() as session:
            job = await session.run_sync(load_job, job_id)
        assert job is not None, job_id
        return job

    async def events(self, job_id: str) -> list[JobEvent]:
        return await event_history(self.db, job_id)

    async def wait_finished(self, job_ids: Iterable[str], within_s: float) -> dict[str, JobRecord]:
        """Wait until every one of the jobs is terminal; fail naming the ones that are not."""
        job_ids = list(job_ids)

        async def rows() -> dict[str, JobRecord]:
            return {job_id: await self.job(job_id) for job_id in job_ids}

        async def finished() -> dict[str, JobRecord] | None:
            current = await rows()
            return current if all(job.status in TERMINAL for job in current.values()) else None

        try:
            done: dict[str, JobRecord] = await eventually(finished, within_s, "the jobs to finish")
        except AssertionError:
            stuck = {
                job_id: job.status for job_id, job in (await rows()).items() if job.status not in TERMINAL
            }
            raise AssertionError(
                f"jobs not finished after {within_s}s: {stuck}. A job left queued means its message"
                " was lost: read from Kafka but never run, and not read again"
            ) from None
        return done

    async def wait_status(self, job_id: str, statuses: set[str], within_s: float) -> JobRecord:
        async def reached() -> JobRecord | None:
            job = await self.job(job_id)
            return job if job.status in statuses else None

        job: JobRecord = await eventually(reached, within_s, f"job {job_id} to reach {statuses}")
        return job


def attempt_spans(events: list[JobEvent]) -> dict[int, tuple[datetime, datetime]]:
    """Each attempt's span from its event history: from its `running` event to the state event that
    ended it. Fails if an attempt has two `running` events, never ended, or overlaps another."""
    starts: dict[int, datetime] = {}
    ends: dict[int, datetime] = {}
    for event in events:
        if event.type != "state":
            continue
        if event.status == JobState.RUNNING:
            assert event.attempt not in starts, f"attempt {event.attempt} has two running events"
            starts[event.attempt] = event.at
        elif event.attempt in starts and event.attempt not in ends:
            ends[event.attempt] = event.at
    assert starts.keys() == ends.keys(), f"attempts started {sorted(starts)}, ended {sorted(ends)}"
    spans = {attempt: (starts[attempt], ends[attempt]) for attempt in sorted(starts)}
    ordered = list(spans.values())
    for (_, end), (next_start, _) in itertools.pairwise(ordered):
        assert end <= next_start, f"attempts overlap: {spans}"
    for event in events:
        if event.type == "progress":
            start, end = spans[event.attempt]
            assert start <= event.at <= end, f"progress of attempt {event.attempt} outside it: {spans}"
    return spans


# --- Reading the workers' logs and the broker ---


def kafka_of(stack: Stack) -> tuple[str, str, str]:
    """The stack's Kafka bootstrap, topic prefix and workers' consumer group."""
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    return stack.env["CONVEYOR_KAFKA_BOOTSTRAP"], prefix, worker_group(prefix)


def worker_id(stack: Stack, worker: str) -> str:
    (started,) = worker_events(stack, "worker.started", worker=worker)
    value: str = started["worker_id"]
    return value


def logged_job_ids(stack: Stack, event: str, worker: str) -> list[str]:
    return [record["job_id"] for record in worker_events(stack, event, worker=worker)]


def all_job_partitions(prefix: str) -> set[TopicPartition]:
    return {
        TopicPartition(job_topic(prefix, priority), partition)
        for priority in PRIORITIES
        for partition in range(PARTITIONS)
    }


async def committed_offset(bootstrap: str, group: str, tp: TopicPartition) -> int:
    """The group's committed offset of `tp` (the next record to read), -1 if none."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
    finally:
        await admin.close()
    return int(offsets[tp].offset) if tp in offsets else -1


async def read_partition(bootstrap: str, tp: TopicPartition, count: int) -> list[tuple[int, str]]:
    """The first `count` job messages of the partition: (offset, job id), read outside the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        messages: list[tuple[int, str]] = []

        async def read() -> bool:
            batches = await consumer.getmany(tp, timeout_ms=500)
            for record in batches.get(tp, []):
                messages.append((record.offset, JobMessage.model_validate_json(record.value).job_id))
            return len(messages) >= count

        await eventually(read, 30, f"{count} messages on {tp}")
        return messages
    finally:
        await consumer.stop()


async def end_offset(bootstrap: str, tp: TopicPartition) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets([tp])
        return int(offsets[tp])
    finally:
        await consumer.stop()


def priority_of(prefix: str, tp: TopicPartition) -> int:
    (priority,) = (priority for priority in PRIORITIES if job_topic(prefix, priority) == tp.topic)
    return priority


# --- 1. A worker joins while jobs run ---

# Long enough to be still running when worker-2 has started and the group has rebalanced.
LONG_S = 15.0
WAITING_S = 3.0
LATER_S = 2.0
# (priority, partition): four partitions in a row of the group's partition order (topics p1..p5, then
# partition), for the jobs that fill worker-1, and the next four for the jobs that wait behind them.
# The group's assignor (aiokafka's default, round robin over the sorted partitions) deals partitions in
# a row to alternate members, so worker-2 takes two of each four: two partitions whose jobs are running
# on worker-1, and two with jobs waiting.
RUNNING_PLACES = [(2, 0), (2, 1), (2, 2), (3, 0)]
WAITING_PLACES = [(3, 1), (3, 2), (4, 0), (4, 1)]


async def test_a_worker_joining_while_jobs_run_loses_and_repeats_no_job(
    stack: Stack, database_url: str
) -> None:
    prefix = stack.env["CONVEYOR_TOPIC_PREFIX"]
    every_partition = all_job_partitions(prefix)
    jobs = Jobs(database_url)
    try:
        await eventually(lambda: assignments(stack, "worker-1"), JOIN_TIMEOUT_S, "worker-1's partitions")
        assert assignments(stack, "worker-1")[0][1] == every_partition

        placed: dict[str, TopicPartition] = {}
        running = []
        for priority, partition in RUNNING_PLACES:
            job_id = await place(stack, partition, priority, sleep_job(LONG_S))
            placed[job_id] = TopicPartition(job_topic(prefix, priority), partition)
            running.append(job_id)
        for job_id in running:
            await jobs.wait_status(job_id, {"running"}, JOB_TIMEOUT_S)
        # worker-1 is at capacity now: these wait for a free slot (or for worker-2).
        waiting = []
        for priority, partition in WAITING_PLACES:
            job_id = await place(stack, partition, priority, sleep_job(WAITING_S))
            placed[job_id] = TopicPartition(job_topic(prefix, priority), partition)
            waiting.append(job_id)

        stack.start("worker-2", "worker")
        await eventually(lambda: assignments(stack, "worker-2"), JOIN_TIMEOUT_S, "worker-2's partitions")
        await eventually(
            lambda: len(assignments(stack, "worker-1")) >= 2, JOIN_TIMEOUT_S, "worker-1's new partitions"
        )
        worker_2_partitions = assignments(stack, "worker-2")[-1][1]
        worker_1_partitions = assignments(stack, "worker-1")[-1][1]
        # Still running when the group had rebalanced: these jobs were in flight when worker-1 gave up
        # its partitions (it does so before the new assignment exists).
        still_running = [job_id for job_id in running if (await jobs.job(job_id)).status == "running"]

        # Later jobs on partitions of each worker: the owner of a partition runs its jobs.
        later = []
        for owned in (worker_1_partitions, worker_2_partitions):
            for tp in sorted(owned)[:3]:
                job_id = await place(stack, tp.partition, priority_of(prefix, tp), sleep_job(LATER_S))
                placed[job_id] = tp
                later.append(job_id)

        finals = await jobs.wait_finished(placed, JOB_TIMEOUT_S)
        histories = {job_id: await jobs.events(job_id) for job_id in placed}
    finally:
        await jobs.close()

    ids = {name: worker_id(stack, name) for name in ("worker-1", "worker-2")}
    owner = {
        tp: name
        for name, owned in (("worker-1", worker_1_partitions), ("worker-2", worker_2_partitions))
        for tp in owned
    }

    # The group rebalanced once, and split the partitions between the two workers.
    assert len(assignments(stack, "worker-1")) == 2
    assert len(assignments(stack, "worker-2")) == 1
    assert worker_1_partitions and worker_2_partitions
    assert worker_1_partitions | worker_2_partitions == every_partition
    assert not worker_1_partitions & worker_2_partitions

    # No job lost, none ran twice.
    assert {job_id: job.status for job_id, job in finals.items() if job.status != "succeeded"} == {}
    assert {job_id: job.attempts for job_id, job in finals.items() if job.attempts != 1} == {}
    for job_id, events in histories.items():
        assert list(attempt_spans(events)) == [1], job_id
    started = logged_job_ids(stack, "job.started", "worker-1") + logged_job_ids(
        stack, "job.started", "worker-2"
    )
    assert sorted(started) == sorted(placed), "each job started exactly once"
    for name in ("worker-1", "worker-2"):
        assert worker_events(stack, "job.outcome_rejected", worker=name) == []
        assert worker_events(stack, "lease.lost", worker=name) == []

    # The jobs worker-1 was running ran to the end there, wherever their partition went.
    assert {job_id: finals[job_id].worker_id for job_id in running} == dict.fromkeys(running, ids["worker-1"])
    # A job that waited through the rebalance (worker-1 had no slot to take it), or that was submitted
    # after it, ran on its partition's new owner; and worker-2 had some of each.
    after = waiting + later
    assert {job_id: finals[job_id].worker_id for job_id in after} == {
        job_id: ids[owner[placed[job_id]]] for job_id in after
    }
    assert any(owner[placed[job_id]] == "worker-2" for job_id in waiting)
    assert any(owner[placed[job_id]] == "worker-2" for job_id in later)

    # The messages of jobs in flight on worker-1 were not committed past: the new owner read them again,
    # found the job not claimable (running, or done by then) and skipped it.
    moved_in_flight = [job_id for job_id in still_running if owner[placed[job_id]] == "worker-2"]
    assert moved_in_flight, (
        f"no job in flight on worker-1 moved to worker-2 ({still_running=}, {worker_2_partitions=}):"
        " the test needs the round-robin assignment described above, and worker-2 to join within"
        f" {LONG_S} s"
    )
    skipped_by_2 = logged_job_ids(stack, "job.skipped", "worker-2")
    for job_id in moved_in_flight:
        assert job_id in skipped_by_2, f"worker-2 did not read {job_id}'s message again"
    # worker-2 skipped nothing else: whatever it read of worker-1's partitions, it found done or running.
    for record in worker_events(stack, "job.skipped", worker="worker-2"):
        assert record["reason"] == "not claimable"
        assert record["job_id"] in placed


# --- 2. Jobs longer than max.poll.interval.ms ---

MAX_POLL_INTERVAL_MS = 3000
# Five times the interval. An aiokafka consumer that does not poll for longer than the interval leaves
# its group (its heartbeat task sends LeaveGroup) and, at its next poll, rejoins as a new member and
# gets its partitions assigned again: both would show below.
OVERRUN_S = 15.0


# What these two test is Kafka's group protocol (polls, commits, rebalances), which the database does
# not take part in: on SQLite only. A rebalance's claims on PostgreSQL are in the joining-worker test.
KAFKA_ONLY = pytest.mark.parametrize("database_kind", ["sqlite"], indirect=True)


@KAFKA_ONLY
@pytest.mark.parametrize(
    ("worker_env", "at_capacity"),
    [
        pytest.param(
            {
                "CONVEYOR_KAFKA_MAX_POLL_INTERVAL_MS": str(MAX_POLL_INTERVAL_MS),
                "CONVEYOR_WORKER_CONCURRENCY": "1",
            },
            True,
            id="at-capacity",
        ),
        pytest.param(
            {
                "CONVEYOR_KAFKA_MAX_POLL_INTERVAL_MS": str(MAX_POLL_INTERVAL_MS),
                "CONVEYOR_WORKER_CONCURRENCY": "4",
            },
            False,
            id="below-capacity",
        ),
    ],
)
async def test_a_job_longer_than_max_poll_interval_keeps_its_worker_in_the_group(
    stack: Stack, database_url: str, at_capacity: bool
) -> None:
    bootstrap, _, group = kafka_of(stack)
    jobs = Jobs(database_url)
    try:
        await eventually(lambda: assignments(stack, "worker-1"), JOIN_TIMEOUT_S, "worker-1's partitions")
        state, members = await group_members(bootstrap, group)

        long = await place(stack, 0, 3, sleep_job(OVERRUN_S))
        await jobs.wait_status(long, {"running"}, JOB_TIMEOUT_S)
        # A job behind it, on another partition: at capacity it waits for the slot, with the worker
        # still polling meanwhile (the case a consumer that stops polling when busy gets wrong); below
        # capacity it runs beside the long one.
        behind = await place(stack, 1, 3, sleep_job(1))
        long_final = await jobs.wait_status(long, TERMINAL, OVERRUN_S + JOB_TIMEOUT_S)
        behind_final = await jobs.wait_status(behind, TERMINAL, JOB_TIMEOUT_S)
        state_after, members_after = await group_members(bootstrap, group)
        history = await jobs.events(long)
    finally:
        await jobs.close()

    assert (state, len(members)) == ("Stable", 1)
    assert long_final.status == "succeeded"
    assert long_final.attempts == 1
    assert list(attempt_spans(history)) == [1]
    assert long_final.started_at is not None and long_final.finished_at is not None
    ran_s = (long_final.finished_at - long_final.started_at).total_seconds()
    assert ran_s >= 3 * MAX_POLL_INTERVAL_MS / 1000, ran_s
    # Never out of the group: the same member throughout (a member that is dropped for not polling
    # rejoins under a new id), and the worker's partitions were assigned once only.
    assert (state_after, members_after) == ("Stable", members)
    assert len(assignments(stack, "worker-1")) == 1
    assert worker_events(stack, "job.skipped") == []

    assert behind_final.status == "succeeded"
    assert behind_final.attempts == 1
    assert behind_final.started_at is not None
    if at_capacity:
        assert behind_final.started_at >= long_final.finished_at
    else:
        assert behind_final.started_at < long_final.finished_at


# --- 3. Offsets are never committed past an unfinished job ---

# Runs until the worker is killed, then once more in full on the next worker.
UNFINISHED_S = 12.0
SHORT_S = 0.5


@KAFKA_ONLY
async def test_a_partition_is_never_committed_past_a_job_still_running(
    stack: Stack, database_url: str
) -> None:
    bootstrap, prefix, group = kafka_of(stack)
    partition = TopicPartition(job_topic(prefix, 3), 0)
    probe_partition = TopicPartition(job_topic(prefix, 3), 1)
    jobs = Jobs(database_url)
    try:
        await eventually(lambda: assignments(stack, "worker-1"), JOIN_TIMEOUT_S, "worker-1's partitions")
        # A finished job first, so the partition has a committed offset to keep.
        first = await place(stack, 0, 3, {"type": "demo.echo", "payload": {"first": True}})
        await jobs.wait_status(first, {"succeeded"}, JOB_TIMEOUT_S)

        async def committed(tp: TopicPartition, offset: int) -> bool:
            return await committed_offset(bootstrap, group, tp) == offset

        await eventually(lambda: committed(partition, 1), JOB_TIMEOUT_S, "the first job's offset committed")

        # Then, on the same partition, a long job and short ones behind it: all four run at once
        # (concurrency 4) and the short ones finish first.
        unfinished = await place(stack, 0, 3, sleep_job(UNFINISHED_S))
        await jobs.wait_status(unfinished, {"running"}, JOB_TIMEOUT_S)
        shorts = [await place(stack, 0, 3, sleep_job(SHORT_S)) for _ in range(3)]
        for job_id in shorts:
            await jobs.wait_status(job_id, {"succeeded"}, JOB_TIMEOUT_S)
        # A job on another partition, committed after the short ones finished: the worker has had its
        # chance to commit the first partition past them.
        probe = await place(stack, 1, 3, sleep_job(1))
        await jobs.wait_status(probe, {"succeeded"}, JOB_TIMEOUT_S)
        await eventually(lambda: committed(probe_partition, 1), JOB_TIMEOUT_S, "the probe's offset committed")
        committed_before_kill = await committed_offset(bootstrap, group, partition)
        offsets: dict[str, int] = {}
        for offset, job_id in await read_partition(bootstrap, partition, 5):
            offsets.setdefault(job_id, offset)
        unfinished_before_kill = await jobs.job(unfinished)
        assert unfinished_before_kill.status == "running", "the long job ended before the kill: too slow"

        stack.kill("worker-1")
        stack.start("worker-2", "worker")
        final = await jobs.wait_status(unfinished, TERMINAL, JOB_TIMEOUT_S + UNFINISHED_S + TEST_LEASE_S)
        short_finals = [await jobs.job(job_id) for job_id in shorts]
        unfinished_history = await jobs.events(unfinished)
        short_histories = [await jobs.events(job_id) for job_id in shorts]
        # worker-2 goes on committing: the partition's offset reaches its end.
        end = await end_offset(bootstrap, partition)
        await eventually(lambda: committed(partition, end), JOB_TIMEOUT_S, "worker-2 to commit the partition")
    finally:
        await jobs.close()

    assert offsets[first] < offsets[unfinished] < min(offsets[job_id] for job_id in shorts)
    # Jobs after it finished, the long one did not: the committed offset stayed at the long job's.
    assert committed_before_kill == offsets[unfinished]

    # The long job's attempt died with worker-1; the next one ran on worker-2 and succeeded.
    assert final.status == "succeeded"
    assert final.attempts == 2
    assert final.worker_id == worker_id(stack, "worker-2")
    assert list(attempt_spans(unfinished_history)) == [1, 2]
    (ended_first,) = [
        event
        for event in unfinished_history
        if event.type == "state" and event.attempt == 1 and event.status != JobState.RUNNING
    ]
    assert ended_first.status == JobState.QUEUED
    # Requeued by worker-2's reaper once worker-1's lease ran out (a queued event carries no error).
    assert [
        record["attempt"] for record in worker_events(stack, "lease.expired", unfinished, "worker-2")
    ] == [1]

    # The short jobs ran once, on worker-1. worker-2 read their messages again (the committed offset was
    # the long job's), found them finished and skipped them; the first job's it did not read again.
    assert [(job.status, job.attempts, job.worker_id) for job in short_finals] == [
        ("succeeded", 1, worker_id(stack, "worker-1"))
    ] * len(shorts)
    for history in short_histories:
        assert list(attempt_spans(history)) == [1]
    skipped = set(logged_job_ids(stack, "job.skipped", "worker-2"))
    assert set(shorts) <= skipped <= {*shorts, unfinished}
    assert logged_job_ids(stack, "job.started", "worker-2") == [unfinished]


# --- 4. ... nor past a running job of a partition its worker keeps through a rebalance ---

KEPT_S = 20.0


async def test_a_partition_kept_through_a_rebalance_is_not_committed_past_its_running_job(
    stack: Stack, database_url: str
) -> None:
    bootstrap, prefix, group = kafka_of(stack)
    jobs = Jobs(database_url)
    try:
        await eventually(lambda: assignments(stack, "worker-1"), JOIN_TIMEOUT_S, "worker-1's partitions")
        # Two partitions in a row of the group's order: through the rebalance worker-1 keeps one of them.
        placed: dict[str, TopicPartition] = {}
        for partition in (0, 1):
            job_id = await place(stack, partition, 3, sleep_job(KEPT_S))
            placed[job_id] = TopicPartition(job_topic(prefix, 3), partition)
            await jobs.wait_status(job_id, {"running"}, JOB_TIMEOUT_S)

        stack.start("worker-2", "worker")
        await eventually(lambda: assignments(stack, "worker-2"), JOIN_TIMEOUT_S, "worker-2's partitions")
        await eventually(
            lambda: len(assignments(stack, "worker-1")) >= 2, JOIN_TIMEOUT_S, "worker-1's new partitions"
        )
        kept = assignments(stack, "worker-1")[-1][1]
        (job_id,) = [job_id for job_id, tp in placed.items() if tp in kept]
        tp = placed[job_id]
        ((offset, _),) = await read_partition(bootstrap, tp, 1)

        # A job on another partition worker-1 kept, committed: worker-1 has committed since the rebalance.
        probe_tp = min(other for other in kept if other != tp)
        probe = await place(stack, probe_tp.partition, priority_of(prefix, probe_tp), sleep_job(1))
        await jobs.wait_status(probe, {"succeeded"}, JOB_TIMEOUT_S)
        probe_end = await end_offset(bootstrap, probe_tp)

        async def probe_committed() -> bool:
            return await committed_offset(bootstrap, group, probe_tp) == probe_end

        await eventually(probe_committed, JOB_TIMEOUT_S, "the probe's offset committed")
        committed = await committed_offset(bootstrap, group, tp)
        still_running = (await jobs.job(job_id)).status == "running"
    finally:
        await jobs.close()

    assert still_running, "the kept job ended before the check: too slow"
    assert committed <= offset, f"committed {committed} past offset {offset} of job {job_id}, still running"
    assert job_id not in logged_job_ids(stack, "job.skipped", "worker-1")
