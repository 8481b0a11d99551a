"""The scheduler, in-process: due jobs are queued a batch at a time, in id order, and only the ones
this worker won are logged."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from conveyor.changes import Outcome
from conveyor.lifecycle import JobState
from services.worker.scheduling import Scheduler

from worker_doubles import RecordingCommitter, job_record, registry_of, worker_context


class Due:
    """A database with due jobs, handed out `limit` at a time."""

    def __init__(self, *job_ids: str) -> None:
        self.waiting = [job_record(id=job_id, status="scheduled") for job_id in job_ids]

    async def read(self, work: Any) -> list[Any]:
        batch, self.waiting = self.waiting[: work.keywords["limit"]], self.waiting[work.keywords["limit"] :]
        return batch


async def test_a_full_batch_is_followed_at_once_by_the_next() -> None:
    committer = RecordingCommitter()
    scheduler = Scheduler(worker_context(registry_of(), committer, db=Due("c", "a", "b", "e", "d")), batch=2)
    with capture_logs() as logs:
        await scheduler.queue_all_due()
    assert [change.job_id for change in committer.outcomes] == ["a", "c", "b", "e", "d"]
    assert {change.target for change in committer.outcomes} == {JobState.QUEUED}
    assert [record["job_id"] for record in logs if record["event"] == "job.due"] == ["a", "c", "b", "e", "d"]


async def test_jobs_another_worker_queued_first_are_not_counted() -> None:
    committer = RecordingCommitter(outcome=Outcome.STALE)
    scheduler = Scheduler(worker_context(registry_of(), committer, db=Due("a", "b")), batch=2)
    with capture_logs() as logs:
        assert await scheduler.queue_due() == 0
    assert [record for record in logs if record["event"] == "job.due"] == []
