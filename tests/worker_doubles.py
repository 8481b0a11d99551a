"""Stand-ins for the worker's unit tests: a job row, a committer that records the changes it is given,
and a worker context around them. No database, no Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from conveyor.changes import Change, ChangeResult, Outcome, Transition
from conveyor.handlers import JobContext, JobType, Registry
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord, utcnow
from conveyor.settings import Settings
from services.worker.attempt import Execution
from services.worker.context import WorkerContext
from services.worker.reporting import ProgressWriter

WORKER_ID = "worker-under-test"


def job_record(**fields: Any) -> JobRecord:
    """A running job's row, in its first attempt of three unless `fields` say otherwise."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": "job-1",
        "tenant": "t",
        "type": "test.job",
        "status": JobState.RUNNING,
        "priority": 3,
        "payload": {},
        "result": None,
        "error": None,
        "progress_percent": None,
        "progress_message": None,
        "attempts": 1,
        "max_attempts": 3,
        "labels": {},
        "run_at": None,
        "timeout_s": None,
        "last_seq": 0,
        "worker_id": WORKER_ID,
        "lease_expires_at": None,
        "created_at": now,
        "updated_at": now,
        "started_at": now,
        "finished_at": None,
    }
    values.update(fields)
    return JobRecord(**values)


class RecordingCommitter:
    """Answers every change as written (or as `outcome`), after failing the next `failures` calls."""

    def __init__(self, outcome: Outcome = Outcome.WRITTEN) -> None:
        self.applied: list[Change] = []
        self.outcome = outcome
        self.failures = 0
        self.calls = 0
        self.changed = asyncio.Event()

    async def apply(
        self, changes: Sequence[Change], *, atomic: bool = False, trace: str | None = None
    ) -> list[ChangeResult]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the database does not answer")
        self.applied.extend(changes)
        self.changed.set()
        return [self._result(change) for change in changes]

    def _result(self, change: Change) -> ChangeResult:
        if isinstance(change, Transition) and self.outcome is Outcome.WRITTEN:
            return ChangeResult(self.outcome, job_record(id=change.job_id, status=change.target))
        return ChangeResult(self.outcome)

    @property
    def outcomes(self) -> list[Transition]:
        """The transitions recorded: attempts' outcomes, without the progress reports."""
        return [change for change in self.applied if isinstance(change, Transition)]


def registry_of(*job_types: JobType) -> Registry:
    registry = Registry()
    for job_type in job_types:
        registry.register(job_type)
    return registry


def worker_context(
    registry: Registry, committer: RecordingCommitter | None = None, *, db: Any = None, **settings: Any
) -> WorkerContext:
    """A context for units that write through the committer (and `db`, a stand-in, if given): no real
    database, relay or broker."""
    values: dict[str, Any] = {"lease_s": 3.0, "cancel_grace_s": 0.2, "retry_base_s": 1.0, "retry_cap_s": 60.0}
    values.update(settings)
    return WorkerContext(
        settings=Settings(**values),
        db=db,
        relay=None,  # type: ignore[arg-type]
        committer=committer or RecordingCommitter(),  # type: ignore[arg-type]
        registry=registry,
        worker_id=WORKER_ID,
    )


def execution_of(
    job: JobRecord, job_type: JobType | None = None, timeout_s: float | None = None
) -> Execution:
    """An attempt as the executor would hold it, for testing one policy on its own (in a running loop)."""

    async def report(percent: float | None, text: str | None) -> None:
        progress.report(percent, text)

    async def write(percent: float | None, text: str | None) -> None:
        pass

    progress = ProgressWriter(job.id, write)
    context = JobContext(job_id=job.id, tenant=job.tenant, type=job.type, attempt=job.attempts, report=report)
    return Execution(job, context, progress, job_type=job_type, timeout_s=timeout_s)


async def until(check: Callable[[], object], within_s: float = 5.0) -> None:
    """Wait, a loop turn at a time, until `check()` is true; fail after `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within_s} s: {check}")
        await asyncio.sleep(0.001)
