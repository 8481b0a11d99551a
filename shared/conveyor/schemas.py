"""The HTTP API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conveyor.events import Progress
from conveyor.lifecycle import JobState
from conveyor.models import Job
from conveyor.topics import DEFAULT_PRIORITY, HIGHEST_PRIORITY, LOWEST_PRIORITY

MAX_ATTEMPTS_LIMIT = 100


class JobSubmission(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"type": "demo.sleep", "payload": {"seconds": 2, "steps": 4}}]},
    )

    type: str = Field(min_length=1, max_length=200, description="A registered job type.")
    payload: Any = Field(default_factory=dict, description="Validated against the job type's schema.")
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=HIGHEST_PRIORITY,
        le=LOWEST_PRIORITY,
        description="1 is the most urgent, 5 the least.",
    )
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS_LIMIT)


class JobLinks(BaseModel):
    self: str
    events: str


class JobResource(BaseModel):
    id: str
    type: str
    status: JobState
    priority: int
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    result: Any | None = None
    error: dict[str, Any] | None = None
    links: JobLinks


class JobTypeInfo(BaseModel):
    name: str
    description: str
    payload_schema: dict[str, Any]


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def job_resource(job: Job, events_base_url: str) -> JobResource:
    status = JobState(job.status)
    return JobResource(
        id=job.id,
        type=job.type,
        status=status,
        priority=job.priority,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=Progress(percent=job.progress_percent, message=job.progress_message),
        result=job.result if status is JobState.SUCCEEDED else None,
        error=job.error,
        links=JobLinks(self=job_path(job.id), events=f"{events_base_url}{job_path(job.id)}/events"),
    )
