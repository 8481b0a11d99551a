"""The API's resources as the client sees them: a job, one of its events, the job types, the queue's
counts. Typed, and lenient about fields a newer server adds (they are kept, not refused)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor.lifecycle import JobState

# The server's own states (`is_terminal` included): client and server share one lifecycle, under the
# name a client reads best (`job.status is JobStatus.SUCCEEDED`).
JobStatus = JobState


class _Resource(BaseModel):
    # extra="allow": a field a newer server adds is kept (and printed by `--json`), not an error.
    model_config = ConfigDict(extra="allow", frozen=True)


class Progress(_Resource):
    percent: float | None = None
    message: str | None = None


class JobError(_Resource):
    """What made an attempt fail: the exception's type and message, and which attempt."""

    type: str
    message: str = ""
    attempt: int | None = None


class JobLinks(_Resource):
    self: str
    events: str | None = None
    cancel: str | None = None
    result: str | None = None
    retry: str | None = None


class Job(_Resource):
    """The job resource: what `POST /v1/jobs`, the status monitor and a live snapshot answer."""

    id: str
    type: str
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    labels: dict[str, str] = Field(default_factory=dict)
    run_at: datetime | None = None
    timeout_s: float | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    result: Any | None = None
    error: JobError | None = None
    links: JobLinks

    @property
    def finished(self) -> bool:
        return self.status.is_terminal


class Event(_Resource):
    """One message of a job's live stream: its `snapshot` (with `job`), then each `state` or
    `progress` event, numbered by `seq` (1, 2, 3... per job). A progress event that stands for several
    reports the server merged carries `coalesced_from`, the first `seq` it stands for."""

    type: str
    job_id: str
    seq: int
    status: JobStatus
    progress: Progress = Field(default_factory=Progress)
    attempt: int | None = None
    at: datetime | None = None
    result: Any | None = None
    error: JobError | None = None
    run_at: datetime | None = None
    coalesced_from: int | None = None
    job: Job | None = None

    @property
    def terminal(self) -> bool:
        return self.status.is_terminal

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Event:
        """An event from a stream's message: a snapshot takes its status, progress, result and error
        from the job it carries."""
        if message.get("type") == "snapshot":
            job = Job.model_validate(message["job"])
            return cls(
                type="snapshot",
                job_id=job.id,
                seq=message["seq"],
                status=job.status,
                progress=job.progress,
                attempt=job.attempts,
                at=job.updated_at,
                result=job.result,
                error=job.error,
                run_at=job.run_at,
                job=job,
            )
        return cls.model_validate(message)


class JobPage(_Resource):
    items: list[Job]
    next_cursor: str | None = None


class JobType(_Resource):
    name: str
    description: str = ""
    payload_schema: dict[str, Any] = Field(default_factory=dict)


class PriorityCounts(_Resource):
    scheduled: int = 0
    queued: int = 0
    running: int = 0


class FinishedCounts(_Resource):
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0


class Stats(_Resource):
    """`GET /v1/stats`: the tenant's queue right now."""

    at: datetime
    priorities: dict[int, PriorityCounts]
    totals: PriorityCounts
    finished_last_minute: FinishedCounts
    oldest_queued_at: datetime | None = None


class Submission(BaseModel):
    """One job of `submit_many`, with the fields of `submit`."""

    model_config = ConfigDict(extra="forbid")

    type: str
    payload: Any | None = None
    priority: int | None = None
    labels: dict[str, str] | None = None
    delay_s: float | None = None
    run_at: datetime | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None

    def body(self) -> dict[str, Any]:
        """The submission as the API takes it: only the fields given."""
        return self.model_dump(mode="json", exclude_none=True)
