"""The worker loop: read job messages, claim as many as there are free slots in one transaction, run
them, commit what is finished.

The loop never blocks on a job: handlers run in tasks while the loop keeps polling Kafka, so a job
that runs for an hour never pushes the worker out of its consumer group (max.poll.interval.ms).
At capacity the loop waits for a slot to free, and still polls. An offset is committed only once every
job before it on its partition has reached a recorded state.

Records go from the consumer into the intake (`intake.py`) as they arrive, up to a read-ahead per
partition. Free slots take jobs from it by priority level (16:8:4:2:1 by default), then by tenant in
turn, and all the jobs taken at once are claimed in one transaction, with whatever else the process's
committer has gathered (outcomes, progress). Nothing waits for a Kafka acknowledgement: a claimed job
starts as soon as its claim is committed, and its slot is free as soon as its handler ends.

Beside the loop, each worker runs a lease keeper (heartbeats, the reaper, and the watch for cancels)
and a scheduler that queues scheduled jobs once they are due.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from conveyor import changes, collector, processes
from conveyor.broker import create_job_consumer, stop_consumer, subscribe_to_jobs
from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.events import JobMessage
from conveyor.handlers import Registry
from conveyor.models import JobRecord
from conveyor.outbox import OutboxRelay
from conveyor.retries import Backoff
from conveyor.settings import Settings
from conveyor.topics import worker_group
from conveyor.topics_setup import TopicKeeper
from services.worker.execution import JobExecutor
from services.worker.intake import Intake, Pending
from services.worker.leases import LeaseKeeper
from services.worker.offsets import OffsetTracker
from services.worker.scheduling import Scheduler

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200
# A partition no consumer is ever assigned. Polling only it returns nothing and leaves every prefetched
# record in place, yet counts as a poll: how a worker at capacity stays in its group.
NO_PARTITION = TopicPartition("", -1)
# How long the broker holds a fetch of empty partitions open (Kafka's default is 500 ms). The consumer
# has one fetch in flight at a time, and a partition that has just been emptied waits for it before it
# is fetched again: a short hold bounds how long a new p1 job can wait for that. A fetch is answered as
# soon as there is anything for it: asking for fuller fetches cost new jobs up to the hold in latency
# and saved nothing measurable once the collector was tuned (`conveyor.collector`).
FETCH_MAX_WAIT_MS = 100
COMMIT_INTERVAL_S = 0.5
# Records taken from the consumer per read, from each priority level in turn, so that a slot chooses
# among every level from the start. Parsing records holds the event loop, and the free slots wait for
# it: 500 at a time finished 6% more jobs per second than taking everything fetched (5,000) at once.
READ_BATCH_PER_LEVEL = 100
# The wait for records when the intake is empty takes this many, from whichever level has them.
READ_BATCH = 500
# A claim the database did not take is tried again after this long, doubling up to the cap.
CLAIM_RETRY_BASE_S = 0.5
CLAIM_RETRY_CAP_S = 30.0
# Kafka calls that could block a stopping worker forever while the broker is down get this long.
COMMIT_TIMEOUT_S = 5.0
# After the drain's grace, how long handing back the jobs still running may take: interrupting a
# handler (its cleanup gets execution.INTERRUPT_WAIT_S) and one write each.
HAND_BACK_TIMEOUT_S = 15.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:  # aiokafka also calls this, with nothing, before the first assignment
            log.info(
                "worker.revoked",
                partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in revoked),
                in_flight=self._worker.offsets.in_flight,
            )
        await self._worker.commit(set(revoked))
        self._worker.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("worker.assigned", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Worker:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        processes.configure(settings)  # the pool for `process=True` handlers, started by the first one
        self.worker_id = new_worker_id()
        self.db = Database(settings.resolved_database_url)
        self.relay = OutboxRelay(self.db, settings.kafka_bootstrap)
        self.committer = Committer(self.db, self.relay, settings.topic_prefix)
        self.executor = JobExecutor(
            committer=self.committer,
            registry=registry,
            worker_id=self.worker_id,
            lease_s=settings.lease_s,
            cancel_grace_s=settings.cancel_grace_s,
            backoff=Backoff(base_s=settings.retry_base_s, cap_s=settings.retry_cap_s),
        )
        self.leases = LeaseKeeper(
            db=self.db, committer=self.committer, executor=self.executor, lease_s=settings.lease_s
        )
        self.scheduler = Scheduler(db=self.db, committer=self.committer)
        self.offsets = OffsetTracker()
        self.intake = Intake(
            settings.topic_prefix,
            settings.priority_weights,
            tenant_weight=lambda tenant: settings.limits_for(tenant).weight,
            read_ahead=settings.worker_read_ahead,
        )
        self.concurrency = settings.worker_concurrency
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # False while the worker has left the consumer group because its database does not answer.
        self._in_group = True
        self._listener = _CommitOnRevoke(self)
        # The records whose jobs wait in the intake or run here, by partition and offset.
        self._held_records: set[tuple[TopicPartition, int]] = set()
        self._claim_failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        await self.db.migrate()
        topics = TopicKeeper(self.settings)
        await topics.start()
        await topics.ready.wait()
        await self.relay.start()
        await self.committer.start()
        await self.leases.start()
        await self.scheduler.start()
        self._consumer = create_job_consumer(
            self.settings.kafka_bootstrap,
            self.settings.topic_prefix,
            worker_group(self.settings.topic_prefix),
            listener=self._listener,
            max_poll_interval_ms=self.settings.kafka_max_poll_interval_ms,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        await self._consumer.start()
        collector.started()
        log.info("worker.started", worker_id=self.worker_id, concurrency=self.concurrency)
        try:
            await self._loop(stop)
            await self._drain(self.settings.drain_grace_s)
        finally:
            await self._shutdown(topics)

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while not stop.is_set():
            if not await self._keep_membership():
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            await self._read(timeout_ms=0)
            free = self.concurrency - self.executor.busy
            if free > 0 and len(self.intake):
                await self._start(self.intake.take(free))
            elif free > 0:
                await self._read(timeout_ms=POLL_TIMEOUT_MS)  # idle: wait for the next records
            else:
                # At capacity: wake as soon as a handler ends. The read at the top of the loop polls the
                # consumer, so it stays in its group however long the jobs run.
                self.executor.slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.executor.slot_freed.wait(), POLL_TIMEOUT_MS / 1000)
            if loop.time() - last_commit >= COMMIT_INTERVAL_S:
                await self.commit()
                last_commit = loop.time()

    async def _keep_membership(self) -> bool:
        """Leave the consumer group while the database is out of reach, and join again once it answers;
        whether the worker is in the group now. Without its database a worker cannot claim the jobs of
        its partitions; out of the group, those partitions go to workers that can."""
        assert self._consumer is not None
        lost = self.leases.database_lost
        if self._in_group and lost:
            await self.commit()
            self._consumer.unsubscribe()
            self.forget(self.offsets.partitions)
            self._in_group = False
            log.warning("worker.left_group", reason="the database does not answer")
        elif not self._in_group and not lost:
            subscribe_to_jobs(self._consumer, self.settings.topic_prefix, self._listener)
            self._in_group = True
            log.info("worker.rejoined_group")
        return self._in_group

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop what this worker read from partitions it no longer owns: their records will be read, and
        their commits made, by the next owner. Jobs of theirs that run here go on, and are recorded."""
        self.offsets.forget(partitions)
        for pending in self.intake.drop(partitions):
            self._held_records.discard((pending.tp, pending.offset))

    async def _read(self, timeout_ms: int) -> None:
        """Move the records that have arrived into the intake, waiting up to `timeout_ms` for some. Only
        partitions whose read-ahead has room are read; a poll of none still counts as a poll."""
        assert self._consumer is not None
        partitions = self.intake.with_room(self._consumer.assignment())
        if not partitions:
            await self._consumer.getmany(NO_PARTITION, timeout_ms=0)
            if timeout_ms:
                await asyncio.sleep(timeout_ms / 1000)
            return
        if timeout_ms:
            batches = await self._consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=READ_BATCH)
            self._accept_all(batches)
            return
        # Without a wait, getmany hands out only what the consumer has fetched already.
        for level in self.intake.by_level(partitions):
            self._accept_all(await self._consumer.getmany(*level, max_records=READ_BATCH_PER_LEVEL))

    def _accept_all(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, records in batches.items():
            for record in records:
                self._accept(tp, record.offset, record.value)

    def _accept(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        self.offsets.started(tp, offset)
        if (tp, offset) in self._held_records:
            # A rebalance took the partition away and gave it back while the job ran, so it was read
            # again. Its first task still runs it and will release the offset when the job is recorded;
            # running it twice would skip the job at once and let the commit pass it while it runs.
            return
        try:
            message = JobMessage.model_validate_json(value)
        except ValidationError:
            log.error("worker.bad_message", topic=tp.topic, partition=tp.partition, offset=offset)
            self.offsets.finished(tp, offset)
            return
        self._held_records.add((tp, offset))
        self.intake.add(Pending(tp, offset, message))

    async def _start(self, taken: list[Pending]) -> None:
        """Claim the jobs taken for the free slots, in one transaction, and run the ones claimed."""
        claims = [
            changes.claim(pending.message.job_id, self.worker_id, self.settings.lease_s) for pending in taken
        ]
        try:
            results = await self.committer.apply(claims)
        except Exception as exc:
            # The database did not answer: the jobs wait in the intake, and the claim is tried again.
            self._claim_failures += 1
            log.warning("worker.claim_failed", jobs=len(taken), failures=self._claim_failures, error=str(exc))
            self.intake.put_back(taken)
            await asyncio.sleep(
                min(CLAIM_RETRY_CAP_S, CLAIM_RETRY_BASE_S * 2 ** min(self._claim_failures, 6))
            )
            return
        self._claim_failures = 0
        for pending, result in zip(taken, results, strict=True):
            if result.job is None:
                log.info("job.skipped", job_id=pending.message.job_id, reason="not claimable")
                self._release(pending)
                continue
            task = asyncio.create_task(self._run(pending, result.job), name=f"job-{result.job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, pending: Pending, job: JobRecord) -> None:
        try:
            await self.executor.execute(job)
        except Exception:
            log.exception("worker.execute_failed", job_id=job.id)
        finally:
            self._release(pending)

    def _release(self, pending: Pending) -> None:
        """The record's job has reached a recorded state (or was not this worker's to run): its offset
        may be committed once those before it are too."""
        self._held_records.discard((pending.tp, pending.offset))
        self.offsets.finished(pending.tp, pending.offset)

    async def commit(self, partitions: set[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        offsets = self.offsets.committable(partitions)
        if not offsets:
            return
        try:
            # Bounded, so a broker outage cannot stall the loop (or a stopping worker) in a commit: what
            # is not committed is read again later, and its jobs, already recorded, are skipped.
            await asyncio.wait_for(self._consumer.commit(offsets), COMMIT_TIMEOUT_S)
        except (CommitFailedError, KafkaError, TimeoutError) as exc:
            log.warning("worker.commit_failed", error=str(exc) or type(exc).__name__)
            return
        self.offsets.mark_committed(offsets)

    async def _drain(self, grace_s: float) -> None:
        """SIGTERM: stop fetching (the loop has ended), tell the handlers (`ctx.cancelled`), give them
        `grace_s` to finish, hand back the jobs still running (queued again at once, for another worker,
        rather than after their lease runs out), and commit. Leaving the group follows in `_shutdown`."""
        log.info("worker.draining", in_flight=len(self._tasks), grace_s=grace_s)
        self.executor.drain()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        if self._tasks:
            log.info("worker.handing_back", jobs=len(self.executor.running))
            self.executor.hand_back_all()
            await asyncio.wait(set(self._tasks), timeout=HAND_BACK_TIMEOUT_S)
        # Still not done: the database is out of reach. Those jobs' leases will run out, and the reaper
        # of another worker requeues them.
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.commit()

    async def _shutdown(self, topics: TopicKeeper) -> None:
        await self.scheduler.stop()
        await self.leases.stop()
        # Leaves the group, so the partitions move to the other workers at once rather than after the
        # session timeout; bounded, since while the broker is down this could wait forever.
        if self._consumer is not None and not await stop_consumer(self._consumer):
            log.warning("worker.consumer_stop_unclean")
        await self.committer.stop()
        await self.relay.stop()
        await topics.stop()
        await self.db.close()
        await asyncio.to_thread(processes.shutdown)
        log.info("worker.stopped", worker_id=self.worker_id)
