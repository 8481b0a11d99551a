"""The worker loop: read job messages, claim as many as there are free slots in one transaction, run
them, commit what is finished.

The loop never blocks on a job: handlers run in tasks while the loop keeps polling Kafka, so a job
that runs for an hour never pushes the worker out of its consumer group (max.poll.interval.ms).
At capacity the loop waits for a slot to free, and still polls. An offset is committed only once every
job before it on its partition has reached a recorded state (`feed.py`).

Free slots take jobs from the intake by priority level (16:8:4:2:1 by default), then by tenant in
turn, and all the jobs taken at once are claimed in one transaction, with whatever else the process's
committer has gathered (outcomes, progress). Nothing waits for a Kafka acknowledgement: a claimed job
starts as soon as its claim is committed, and its slot is free as soon as its handler ends. How one
job runs is the executor's (`execution.py`), with its policies (`middleware/`).

Beside the loop, each worker runs a lease keeper (heartbeats, the reaper, and the watch for cancels),
a scheduler that queues scheduled jobs once they are due, and a sweep that publishes again the queued
jobs whose Kafka messages were lost (`strays.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog
from opentelemetry import trace

from conveyor import changes, collector, metrics, processes
from conveyor.background import exponential_delay
from conveyor.handlers import Registry
from conveyor.metrics_server import MetricsServer
from conveyor.models import JobRecord
from conveyor.settings import Settings
from conveyor.topics_setup import TopicKeeper
from services.worker.context import WorkerContext
from services.worker.execution import JobExecutor
from services.worker.feed import JobFeed
from services.worker.intake import Intake, Pending
from services.worker.middleware.cancellation import CancelWatch
from services.worker.middleware.drain import drain
from services.worker.middleware.leases import LeaseKeeper
from services.worker.middleware.metrics import SLOTS
from services.worker.scheduling import Scheduler
from services.worker.spans import JobSpans
from services.worker.strays import StraySweep

log = structlog.get_logger(__name__)

POLL_TIMEOUT_MS = 200
COMMIT_INTERVAL_S = 0.5
# A claim the database did not take is tried again after this long, doubling up to the cap.
CLAIM_RETRY_BASE_S = 0.5
CLAIM_RETRY_CAP_S = 30.0


class Worker:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        processes.configure(settings)  # the pool for `process=True` handlers, started by the first one
        metrics.configure(settings.metrics_tenant_label)
        self.context = WorkerContext.build(settings, registry)
        self.executor = JobExecutor(self.context)
        self.leases = LeaseKeeper(self.context, self.executor, CancelWatch(self.context.db, self.executor))
        self.scheduler = Scheduler(self.context)
        self.strays = StraySweep(self.context)
        self.intake = Intake(
            settings.topic_prefix,
            settings.priority_weights,
            tenant_weight=lambda tenant: settings.limits_for(tenant).weight,
            read_ahead=settings.worker_read_ahead,
        )
        self.concurrency = settings.worker_concurrency
        # The tasks running claimed jobs, each until its outcome is recorded.
        self._jobs: set[asyncio.Task[None]] = set()
        self._claim_failures = 0
        self.metrics_server = MetricsServer(settings, settings.worker_metrics_port, service="worker")
        SLOTS.watch(self)

    @property
    def busy(self) -> int:
        """Slots running a handler now."""
        return self.executor.busy

    async def run(self, stop: asyncio.Event) -> None:
        # First, so that a liveness probe is answered while the worker starts (Kafka may be slow).
        await self.metrics_server.start()
        try:
            await self._run(stop)
        finally:
            await self.metrics_server.stop()

    async def _run(self, stop: asyncio.Event) -> None:
        context = self.context
        await context.db.migrate()
        topics = TopicKeeper(context.settings)
        await topics.start()
        await topics.ready.wait()
        await context.relay.start()
        await context.committer.start()
        await self.leases.start()
        self.scheduler.start()
        self.strays.start()
        feed = JobFeed(context.settings, self.intake)
        await feed.start()
        self.leases.partition_for = feed.partition_for
        collector.started()
        log.info("worker.started", worker_id=context.worker_id, concurrency=self.concurrency)
        try:
            await self._loop(feed, stop)
            await drain(self.executor, self._jobs, context.settings.drain_grace_s)
            await feed.commit()
        finally:
            await self._shutdown(feed, topics)

    async def _loop(self, feed: JobFeed, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_commit = loop.time()
        while not stop.is_set():
            if not await feed.keep_membership(self.leases.database_lost):
                await asyncio.sleep(POLL_TIMEOUT_MS / 1000)
                continue
            await feed.read(timeout_ms=0)
            free = self.concurrency - self.executor.busy
            if free > 0 and len(self.intake):
                await self._claim(feed, self.intake.take(free))
            elif free > 0:
                await feed.read(timeout_ms=POLL_TIMEOUT_MS)  # idle: wait for the next records
            else:
                # At capacity: wake as soon as a handler ends. The read at the top of the loop polls the
                # consumer, so it stays in its group however long the jobs run.
                self.executor.slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.executor.slot_freed.wait(), POLL_TIMEOUT_MS / 1000)
            if loop.time() - last_commit >= COMMIT_INTERVAL_S:
                await feed.commit()
                last_commit = loop.time()

    async def _claim(self, feed: JobFeed, taken: list[Pending]) -> None:
        """Claim the jobs taken for the free slots, in one transaction, and run the ones claimed."""
        worker_id, lease_s = self.context.worker_id, self.context.settings.lease_s
        spans = [JobSpans.begin(pending, worker_id) for pending in taken]
        claims = [
            changes.claim(
                pending.message.job_id, worker_id, lease_s, job_spans.claim_carrier if job_spans else None
            )
            for pending, job_spans in zip(taken, spans, strict=True)
        ]
        try:
            results = await self.context.committer.apply(claims)
        except Exception as exc:
            for job_spans in spans:
                if job_spans is not None:
                    job_spans.claim_failed(exc)
            # The database did not answer: the jobs wait in the intake, and the claim is tried again.
            self._claim_failures += 1
            log.warning("worker.claim_failed", jobs=len(taken), failures=self._claim_failures, error=str(exc))
            self.intake.put_back(taken)
            # One doubling ahead of the count: the first retry waits twice the base, as it always has.
            await asyncio.sleep(
                exponential_delay(self._claim_failures + 1, CLAIM_RETRY_BASE_S, CLAIM_RETRY_CAP_S)
            )
            return
        self._claim_failures = 0
        claimed_at = time.time()
        series = metrics.jobs()
        for pending, result, job_spans in zip(taken, results, spans, strict=True):
            if job_spans is not None:
                job_spans.claimed(result.job)
            if result.job is None:
                log.info("job.skipped", job_id=pending.message.job_id, reason="not claimable")
                feed.release(pending)
                continue
            if pending.published_at is not None:
                labels = (str(result.job.priority), *series.tenant(result.job.tenant))
                series.labelled(series.queue_wait, *labels).observe(
                    max(0.0, claimed_at - pending.published_at)
                )
            # The job's task runs in its process span (when tracing): its log lines name the trace.
            current = trace.use_span(job_spans.process) if job_spans else contextlib.nullcontext()
            with current:
                task = asyncio.create_task(
                    self._run_job(feed, pending, result.job, job_spans), name=f"job-{result.job.id}"
                )
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _run_job(self, feed: JobFeed, pending: Pending, job: JobRecord, spans: JobSpans | None) -> None:
        """Run the claimed job to its recorded outcome, then release its record's offset."""
        try:
            await self.executor.execute(job, spans)
        except Exception:
            log.exception("worker.execute_failed", job_id=job.id)
        finally:
            feed.release(pending)

    async def _shutdown(self, feed: JobFeed, topics: TopicKeeper) -> None:
        await self.scheduler.stop()
        await self.strays.stop()
        await self.leases.stop()
        await feed.stop()
        await self.context.committer.stop()
        await self.context.relay.stop()
        await topics.stop()
        await self.context.db.close()
        await asyncio.to_thread(processes.shutdown)
        log.info("worker.stopped", worker_id=self.context.worker_id)
