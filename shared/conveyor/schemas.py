"""The HTTP API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from conveyor.events import Progress
from conveyor.jobfields import shown_fields
from conveyor.lifecycle import JobState
from conveyor.models import JobView
from conveyor.topics import DEFAULT_PRIORITY, HIGHEST_PRIORITY, LOWEST_PRIORITY

MAX_ATTEMPTS_LIMIT = 100
# How far ahead a job may be scheduled, and the longest per-attempt timeout a client may ask for.
MAX_SCHEDULE_AHEAD_S = 366 * 24 * 3600.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_LABELS = 16
# Jobs in one `POST /v1/jobs/batch`.
MAX_BATCH_JOBS = 1000
# The draft's Idempotency-Key: printable ASCII; this bounds the column and rejects abuse.
MAX_IDEMPOTENCY_KEY_LENGTH = 255

LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")]
LabelValue = Annotated[str, StringConstraints(max_length=255, pattern=r"^[^\x00]*$")]

SUBMISSION_EXAMPLES: dict[str, dict[str, Any]] = {
    "simple": {
        "summary": "Run a job now",
        "value": {"type": "demo.sleep", "payload": {"seconds": 2, "steps": 4}},
    },
    "urgent": {
        "summary": "Most urgent, with a timeout and labels",
        "value": {
            "type": "demo.echo",
            "payload": {"invoice": 1042},
            "priority": 1,
            "timeout_s": 60,
            "max_attempts": 5,
            "labels": {"customer": "acme", "batch": "2026-11"},
        },
    },
    "delayed": {
        "summary": "Run in ten minutes",
        "value": {"type": "demo.noop", "delay_s": 600},
    },
    "scheduled": {
        "summary": "Run at a given time",
        "value": {"type": "demo.noop", "run_at": "2030-01-01T09:00:00Z"},
    },
}


class JobSubmission(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [example["value"] for example in SUBMISSION_EXAMPLES.values()]},
    )

    type: str = Field(min_length=1, max_length=200, description="A registered job type.")
    payload: Any = Field(default_factory=dict, description="Validated against the job type's schema.")
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=HIGHEST_PRIORITY,
        le=LOWEST_PRIORITY,
        description="1 is the most urgent, 5 the least.",
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=MAX_ATTEMPTS_LIMIT, description="Attempts before the job fails for good."
    )
    run_at: AwareDatetime | None = Field(
        default=None, description="Run no earlier than this time (with a UTC offset). Not with `delay_s`."
    )
    delay_s: float | None = Field(
        default=None, ge=0, le=MAX_SCHEDULE_AHEAD_S, description="Run this many seconds from now."
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Stop an attempt that runs longer; it counts as failed (`timed_out`).",
    )
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description="Your own small string map; `GET /v1/jobs?label=key=value` filters on it.",
    )


class BatchItem(JobSubmission):
    """One job of a batch: a submission, with its own idempotency key if the client wants one."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
        pattern=r"^[ -~]+$",
        description="Like the Idempotency-Key header of `POST /v1/jobs`, for this job alone.",
    )


class BatchSubmission(BaseModel):
    """`POST /v1/jobs/batch`: up to MAX_BATCH_JOBS jobs, created together or not at all."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[BatchItem] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


class JobLinks(BaseModel):
    self: str
    events: str = Field(description="The job's live events (WebSocket; SSE over HTTP).")
    cancel: str | None = Field(default=None, description="POST here to cancel; absent once finished.")
    result: str | None = Field(default=None, description="The result; present once succeeded.")
    retry: str | None = Field(default=None, description="POST here to run a failed job again.")


class JobResource(BaseModel):
    id: str
    type: str
    status: JobState
    priority: int
    attempts: int
    max_attempts: int
    labels: dict[str, str]
    run_at: datetime | None
    timeout_s: float | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    result: Any | None = None
    error: dict[str, Any] | None = None
    links: JobLinks


class BatchAccepted(BaseModel):
    """The jobs of an accepted batch, in the order of the request."""

    items: list[JobResource]
    replayed: list[int] = Field(
        default_factory=list,
        description="Positions of the items answered with the job an earlier use of their key created.",
    )


class RetryRequest(BaseModel):
    """The optional body of `POST /v1/jobs/<id>/retry`."""

    model_config = ConfigDict(extra="forbid")

    attempts: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ATTEMPTS_LIMIT,
        description="How many more attempts the job gets; by default as many as a new job of its type.",
    )


class JobPage(BaseModel):
    """One page of `GET /v1/jobs`, newest first; `next_cursor` fetches the next, None on the last."""

    items: list[JobResource]
    next_cursor: str | None
    next: str | None = Field(description="The next page's URL (path and query), None on the last page.")


class JobTypeInfo(BaseModel):
    name: str
    description: str
    payload_schema: dict[str, Any]


def inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON Schema with its `$defs` put in place of their references: an OpenAPI document
    has no `$defs`, so a reference left in a request body's schema would point at nothing."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return inline(definitions[reference.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def iso(moment: datetime | None) -> str | None:
    """A UTC time as pydantic writes it (`2026-12-01T09:00:00.123456Z`)."""
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def job_links(job: JobView, events_base_url: str) -> dict[str, str | None]:
    status = job.status
    path = job_path(job.id)
    return {
        "self": path,
        "events": f"{events_base_url}{path}/events",
        "cancel": None if status.is_terminal else f"{path}/cancel",
        "result": f"{path}/result" if status is JobState.SUCCEEDED else None,
        "retry": f"{path}/retry" if status is JobState.FAILED else None,
    }


def resource_document(job: JobView, events_base_url: str) -> dict[str, Any]:
    """The job resource (`JobResource`) as a JSON-ready dict: what the status monitor, the 202 and the
    snapshot of a live stream show. Built by hand, since a model and its dump cost more than the rest
    of a submission. Status, progress, result, error and labels are the job's `shown_fields`, as in
    its events and its dead letter."""
    shown = shown_fields(job)
    return {
        "id": job.id,
        "type": job.type,
        "status": shown["status"],
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "labels": shown["labels"],
        "run_at": iso(job.run_at),
        "timeout_s": job.timeout_s,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "progress": shown["progress"],
        "result": shown["result"],
        "error": shown["error"],
        "links": job_links(job, events_base_url),
    }


def job_resource(job: JobView, events_base_url: str) -> JobResource:
    return JobResource.model_validate(resource_document(job, events_base_url))


class StatusCounts(BaseModel):
    scheduled: int
    queued: int
    running: int


class FinishedCounts(BaseModel):
    succeeded: int
    failed: int
    canceled: int


class QueueStatsResource(BaseModel):
    """`GET /v1/stats`: the tenant's queue at `at`."""

    at: datetime
    priorities: dict[str, StatusCounts] = Field(description="Unfinished jobs per priority, `1` to `5`.")
    totals: StatusCounts
    finished_last_minute: FinishedCounts = Field(description="Jobs that finished in the last 60 s.")
    oldest_queued_at: datetime | None = Field(
        description="When the job that has waited longest in `queued` was queued; None if none is."
    )
