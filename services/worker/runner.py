"""The worker loop: fetch job messages, run up to `concurrency` jobs at once, commit what is finished.

The loop never blocks on a job: handlers run in tasks while the loop keeps polling Kafka, so a job
that runs for an hour never pushes the worker out of its consumer group (max.poll.interval.ms).
At capacity the loop takes nothing but still polls. An offset is committed only once every job before
it on its partition has reached a recorded state.

Each free slot takes one job message: from the priority level whose turn it is, by weight (16:8:4:2:1
by default), and within a level from its partitions in turn (`priorities.py`). What the consumer has
prefetched is only a buffer, taken one record per free slot, so a top-priority job that arrives behind
thousands of prefetched low-priority ones still takes the next free slot.

Beside the loop, each worker runs a lease keeper (heartbeats, the reaper, and the watch for cancels)
and a scheduler that queues scheduled jobs once they are due.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from conveyor import processes
from conveyor.broker import create_job_consumer, stop_consumer, subscribe_to_jobs
from conveyor.database import Database
from conveyor.events import JobMessage
from conveyor.handlers import Registry
from conveyor.outbox import OutboxRelay
from conveyor.retries import Backoff
from conveyor.settings import Settings
from conveyor.topics import worker_group
from conveyor.topics_setup import TopicKeeper
from services.worker.execution import JobExecutor
from services.worker.leases import LeaseKeeper
from services.worker.offsets import OffsetTracker
from services.worker.priorities import PartitionOrder
from services.worker.scheduling import Scheduler

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200
# A partition no consumer is ever assigned. Polling only it returns nothing and leaves every prefetched
# record in place, yet counts as a poll: how a worker at capacity stays in its group.
NO_PARTITION = TopicPartition("", -1)
# How long the broker holds a fetch of empty partitions open (Kafka's default is 500 ms). The consumer
# has one fetch in flight at a time, and a partition that has just been emptied waits for it before it
# is fetched again: a short hold bounds how long a new p1 job can wait for that.
FETCH_MAX_WAIT_MS = 100
COMMIT_INTERVAL_S = 0.5
EXECUTE_RETRY_BASE_S = 0.5
EXECUTE_RETRY_CAP_S = 30.0
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
        self._worker.offsets.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("worker.assigned", partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Worker:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        processes.configure(settings)  # the pool for `process=True` handlers, started by the first one
        self.worker_id = new_worker_id()
        self.db = Database(settings.resolved_database_url)
        self.relay = OutboxRelay(self.db, settings.kafka_bootstrap)
        self.executor = JobExecutor(
            db=self.db,
            relay=self.relay,
            registry=registry,
            prefix=settings.topic_prefix,
            worker_id=self.worker_id,
            lease_s=settings.lease_s,
            cancel_grace_s=settings.cancel_grace_s,
            backoff=Backoff(base_s=settings.retry_base_s, cap_s=settings.retry_cap_s),
        )
        self.leases = LeaseKeeper(
            db=self.db,
            relay=self.relay,
            executor=self.executor,
            prefix=settings.topic_prefix,
            lease_s=settings.lease_s,
        )
        self.scheduler = Scheduler(db=self.db, relay=self.relay, prefix=settings.topic_prefix)
        self.offsets = OffsetTracker()
        self.concurrency = settings.worker_concurrency
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # False while the worker has left the consumer group because its database does not answer.
        self._in_group = True
        self._listener = _CommitOnRevoke(self)
        # The records whose jobs this worker is running, by partition and offset.
        self._running_records: set[tuple[TopicPartition, int]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        await self.db.migrate()
        topics = TopicKeeper(self.settings)
        await topics.start()
        await topics.ready.wait()
        await self.relay.start()
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
        log.info("worker.started", worker_id=self.worker_id, concurrency=self.concurrency)
        try:
            await self._loop(stop)
            await self._drain(self.settings.drain_grace_s)
        finally:
            await self._shutdown(topics)

    async def _loop(self, stop: asyncio.Event) -> None:
        assert self._consumer is not None
        order = PartitionOrder(self.settings.topic_prefix, self.settings.priority_weights)
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while not stop.is_set():
            if not await self._keep_membership():
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            free = self.concurrency - len(self._tasks)
            if free <= 0:
                # At capacity: wake as soon as a job finishes, and still poll so the consumer stays in its
                # group however long the jobs run. Not by pausing the partitions: a poll of a paused
                # partition drops what it had prefetched, so every slot would then take whichever record
                # a fresh fetch returned first, and a paused partition does not fetch a new p1 job.
                await asyncio.wait(
                    set(self._tasks), timeout=POLL_TIMEOUT_MS / 1000, return_when=asyncio.FIRST_COMPLETED
                )
                await self._consumer.getmany(NO_PARTITION, timeout_ms=0)
            elif not await self._take_prefetched(order, free):
                await self._take_first_to_arrive(order)
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
            self.offsets.forget(self.offsets.partitions)
            self._in_group = False
            log.warning("worker.left_group", reason="the database does not answer")
        elif not self._in_group and not lost:
            subscribe_to_jobs(self._consumer, self.settings.topic_prefix, self._listener)
            self._in_group = True
            log.info("worker.rejoined_group")
        return self._in_group

    async def _take_prefetched(self, order: PartitionOrder, free: int) -> int:
        """Fill up to `free` slots with prefetched records, one each, in `order`; how many it filled."""
        for filled in range(free):
            if not await self._take_one_prefetched(order):
                return filled
        return free

    async def _take_one_prefetched(self, order: PartitionOrder) -> bool:
        """Start the job of the next prefetched record by priority; False if nothing is prefetched."""
        assert self._consumer is not None
        for tp in order.candidates(self._consumer.assignment()):
            # Without a wait, getmany hands out only what this partition has prefetched already: it
            # fetches nothing, and leaves the other partitions' records where they are.
            batch = await self._consumer.getmany(tp, timeout_ms=0, max_records=1)
            for record in batch.get(tp, ()):
                order.served(tp)
                self._dispatch(tp, record.offset, record.value)
                return True
        return False

    async def _take_first_to_arrive(self, order: PartitionOrder) -> None:
        """Nothing is prefetched: wait briefly for a record of any partition and start the first one."""
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=1)
        for tp, records in batches.items():
            for record in records:
                order.served(tp)
                self._dispatch(tp, record.offset, record.value)

    def _dispatch(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        self.offsets.started(tp, offset)
        if (tp, offset) in self._running_records:
            # A rebalance took the partition away and gave it back while the job ran, so it was read
            # again. Its first task still runs it and will release the offset when the job is recorded;
            # a second task would skip the job at once and let the commit pass it while it runs.
            return
        self._running_records.add((tp, offset))
        task = asyncio.create_task(
            self._handle(tp, offset, value), name=f"job@{tp.topic}[{tp.partition}]:{offset}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        try:
            await self._run_message(tp, offset, value)
            self.offsets.finished(tp, offset)
        finally:
            self._running_records.discard((tp, offset))

    async def _run_message(self, tp: TopicPartition, offset: int, value: bytes) -> None:
        try:
            message = JobMessage.model_validate_json(value)
        except ValidationError:
            log.error("worker.bad_message", topic=tp.topic, partition=tp.partition, offset=offset)
            return
        failures = 0
        while True:
            try:
                await self.executor.execute(message)
                return
            except Exception:
                # The database did not answer. Try again: a claim that failed is retried; an outcome that
                # could not be recorded makes the retry find the job still running, and its lease runs
                # out so the reaper requeues it. Either way the offset stays uncommitted until then.
                failures += 1
                log.exception("worker.execute_failed", job_id=message.job_id, failures=failures)
                await asyncio.sleep(min(EXECUTE_RETRY_CAP_S, EXECUTE_RETRY_BASE_S * 2 ** min(failures, 6)))

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
        await self.relay.stop()
        await topics.stop()
        await self.db.close()
        await asyncio.to_thread(processes.shutdown)
        log.info("worker.stopped", worker_id=self.worker_id)
