"""Lost job messages: which queued jobs the sweep publishes again (in process), and a job whose Kafka
records were deleted runs once all the same (a real stack, a real `delete_records`)."""

from __future__ import annotations

import functools

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from sqlalchemy import Connection, select

from conveyor.database import Database
from conveyor.models import JOB_MESSAGE_POSITIONS
from conveyor.outbox import record_positions
from services.worker.strays import QueuedMessage, lost

from harness import Stack, eventually, submit, wait_for_status, worker_events

TP = TopicPartition("t.jobs.p3", 0)
# The sweep's grace in the stack test: a job queued this long is looked at.
GRACE_S = 2.0


def test_only_messages_consumed_unclaimed_or_deleted_are_lost() -> None:
    waiting = QueuedMessage("waiting", TP, 120)  # in the backlog: past what was read and what was deleted
    consumed = QueuedMessage("consumed", TP, 95)  # below the committed offset: read, never claimed
    deleted = QueuedMessage("deleted", TP, 40)  # below the log start: deleted
    never_read = QueuedMessage("never-read", TopicPartition("t.jobs.p3", 1), 7)  # no commit there yet
    queued = [waiting, consumed, deleted, never_read]
    committed = {TP: 100, TopicPartition("t.jobs.p3", 1): -1}
    log_start = {TP: 50, TopicPartition("t.jobs.p3", 1): 0}
    assert lost(queued, committed, log_start) == [consumed, deleted]


async def landed_at(db: Database, job_id: str) -> tuple[int, int] | None:
    def read(connection: Connection) -> tuple[int, int] | None:
        positions = JOB_MESSAGE_POSITIONS
        query = select(positions.c.partition, positions.c.offset).where(positions.c.job_id == job_id)
        row = connection.execute(query).first()
        return None if row is None else (row.partition, row.offset)

    return await db.read(read)


async def test_a_jobs_latest_position_replaces_the_one_before(db: Database) -> None:
    """A retry's message lands elsewhere than the first one: only the latest counts."""
    await db.write(lambda connection: record_positions(connection, {"job-a": (0, 5), "job-b": (2, 1)}))
    await db.write(lambda connection: record_positions(connection, {"job-a": (1, 9)}))
    assert await landed_at(db, "job-a") == (1, 9)
    assert await landed_at(db, "job-b") == (2, 1)


@pytest.mark.stack_settings(CONVEYOR_STRAY_GRACE_S=GRACE_S, CONVEYOR_LOG_JSON="true")
async def test_a_queued_job_whose_records_were_deleted_still_runs_once(
    stack: Stack, database_url: str
) -> None:
    stack.stop("worker-1")  # nothing reads the job topics: the jobs stay queued
    db = Database(database_url)
    try:
        async with stack.client() as client:
            lost_job = (await submit(client, {"type": "demo.echo", "payload": "lost"}))["id"]
            waiting_job = (await submit(client, {"type": "demo.echo", "payload": "waiting"}))["id"]
            partition, offset = await eventually(
                functools.partial(landed_at, db, lost_job), 30, "the relay to record where it landed"
            )
            await eventually(functools.partial(landed_at, db, waiting_job), 30, "the second one's position")
            tp = TopicPartition(f"{stack.env['CONVEYOR_TOPIC_PREFIX']}.jobs.p3", partition)
            admin = AIOKafkaAdminClient(bootstrap_servers=stack.env["CONVEYOR_KAFKA_BOOTSTRAP"])
            await admin.start()
            try:
                await admin.delete_records({tp: RecordsToDelete(before_offset=offset + 1)})
            finally:
                await admin.close()

            stack.start("worker-2", "worker")
            finals = [
                await wait_for_status(client, job_id, {"succeeded"}, 90) for job_id in (lost_job, waiting_job)
            ]
    finally:
        await db.close()

    assert [(job["result"], job["attempts"]) for job in finals] == [("lost", 1), ("waiting", 1)]
    republished = [record["job_id"] for record in worker_events(stack, "job.republished", worker="worker-2")]
    # The second job's message was never deleted (it came after the first's, or on another partition):
    # it waited, and was not published again.
    assert republished == [lost_job]
