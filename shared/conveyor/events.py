"""The messages that travel on Kafka: job messages (work to do) and job events (what happened)."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, PrivateAttr

from conveyor.jobfields import shown_fields
from conveyor.jsoncodec import dumps
from conveyor.lifecycle import JobState
from conveyor.models import JobView


class JobMessage(BaseModel):
    """Published on a priority topic. The database row stays the truth: the message only says 'look'."""

    job_id: str
    tenant: str
    type: str
    priority: int
    attempt: int  # the attempt this message asks for: the number of attempts made so far, plus one


class DeadLetter(BaseModel):
    """Published on the dead-letter topic, keyed by job id, when a job has failed its last attempt:
    enough to alert on, inspect and resubmit it without reading the database."""

    job_id: str
    tenant: str
    type: str
    priority: int
    payload: Any
    attempts: int
    max_attempts: int
    error: dict[str, Any] | None
    labels: dict[str, str]
    created_at: datetime
    failed_at: datetime


class Progress(BaseModel):
    percent: float | None = None
    message: str | None = None


class JobEvent(BaseModel):
    """Published on the events topic, keyed by job id, numbered 1, 2, 3... per job."""

    job_id: str
    tenant: str
    seq: int
    type: Literal["state", "progress"]
    status: JobState
    progress: Progress
    attempt: int
    at: datetime
    result: Any | None = None
    # The last attempt's error, for as long as the job has one (`conveyor.jobfields`).
    error: dict[str, Any] | None = None
    # When a `scheduled` job runs: its `run_at`, or the retry time after a failed attempt.
    run_at: datetime | None = None
    _json: str | None = PrivateAttr(default=None)

    @classmethod
    def from_json(cls, raw: bytes) -> JobEvent:
        """Parse an event read from Kafka, keeping its text to send on as it is."""
        event = cls.model_validate_json(raw)
        event._json = raw.decode()
        return event

    def as_json(self) -> str:
        """The event as JSON, serialized once however many clients it is sent to."""
        if self._json is None:
            self._json = self.model_dump_json()
        return self._json

    @functools.cached_property
    def at_s(self) -> float:
        """`at` in seconds since the epoch: read once per subscriber, computed once per event."""
        return self.at.timestamp()

    @functools.cached_property
    def is_terminal(self) -> bool:
        return self.type == "state" and self.status.is_terminal


def job_message_json(job: JobView) -> bytes:
    """The job message that asks for the job's next attempt, as it goes on Kafka."""
    return dumps(
        {
            "job_id": job.id,
            "tenant": job.tenant,
            "type": job.type,
            "priority": job.priority,
            "attempt": job.attempts + 1,
        }
    )


def job_message_for(job: JobView) -> JobMessage:
    return JobMessage.model_validate_json(job_message_json(job))


def dead_letter_for(job: JobView) -> DeadLetter:
    shown = shown_fields(job)
    return DeadLetter(
        job_id=job.id,
        tenant=job.tenant,
        type=job.type,
        priority=job.priority,
        payload=job.payload,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=shown["error"],
        labels=shown["labels"],
        created_at=job.created_at,
        failed_at=job.finished_at or job.updated_at,
    )


def event_fields(job: JobView, kind: Literal["state", "progress"]) -> dict[str, Any]:
    """The event that announces the job row as it is now (its `last_seq` already counts this event),
    as the fields of a `JobEvent` in its order: the one place an event's content is decided. Status,
    progress, result and error are the job's `shown_fields`, as in its resource."""
    shown = shown_fields(job)
    return {
        "job_id": job.id,
        "tenant": job.tenant,
        "seq": job.last_seq,
        "type": kind,
        "status": shown["status"],
        "progress": shown["progress"],
        "attempt": job.attempts,
        "at": job.updated_at,
        "result": shown["result"],
        "error": shown["error"],
        # When a scheduled job runs (its `run_at`, or its retry time): an event says only while it waits.
        "run_at": job.run_at if job.status is JobState.SCHEDULED else None,
    }


def event_json(job: JobView, kind: Literal["state", "progress"]) -> bytes:
    """The event as it is stored in the job's history and published: serialized once, for both."""
    return dumps(event_fields(job, kind))


def event_for(job: JobView, kind: Literal["state", "progress"]) -> JobEvent:
    return JobEvent.from_json(event_json(job, kind))
