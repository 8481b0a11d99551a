"""What a job shows of itself, decided once for every view of it: the job resource (HTTP, and the
snapshot of a live stream), its events (WebSocket, SSE, the history) and its dead letter. Each view
picks the fields it carries from `shown_fields`, so two views of one job never disagree on them."""

from __future__ import annotations

from typing import Any, TypedDict

from conveyor.lifecycle import JobState
from conveyor.models import JobView


class ShownFields(TypedDict):
    status: str
    progress: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    labels: dict[str, str]


def shown_fields(job: JobView) -> ShownFields:
    """The fields every view of the job shows alike, as JSON-ready values."""
    status = job.status
    return {
        "status": status.value,
        "progress": {"percent": job.progress_percent, "message": job.progress_message},
        "result": job.result if status is JobState.SUCCEEDED else None,
        # The last attempt's error, for as long as the job has one: once it failed, while a failed
        # attempt waits for its retry, and after a retry or a hand-back until the next attempt ends.
        "error": job.error,
        "labels": job.labels or {},
    }
