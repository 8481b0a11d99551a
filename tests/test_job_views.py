"""The views of a job (its HTTP resource, its event, its dead letter) show the same fields alike, in
every state, because each is built from `conveyor.jobfields.shown_fields`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from conveyor.events import dead_letter_for, event_fields, event_for
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord
from conveyor.schemas import job_resource, resource_document

AT = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ERROR = {"type": "DemoFailure", "message": "no", "attempt": 1}
JOB = JobRecord(
    id="0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10",
    tenant="t",
    type="demo.echo",
    status=JobState.QUEUED,
    priority=3,
    payload={"n": 1},
    result=None,
    error=None,
    progress_percent=None,
    progress_message=None,
    attempts=1,
    max_attempts=3,
    labels={"customer": "acme"},
    run_at=None,
    timeout_s=None,
    last_seq=3,
    worker_id=None,
    lease_expires_at=None,
    created_at=AT,
    updated_at=AT,
    started_at=AT,
    finished_at=None,
)
SHARED = ("status", "progress", "result", "error")


@pytest.mark.parametrize("status", list(JobState))
@pytest.mark.parametrize("error", [None, ERROR])
def test_the_resource_and_the_event_show_status_progress_result_and_error_alike(
    status: JobState, error: dict[str, object] | None
) -> None:
    job = replace(
        JOB,
        status=status,
        error=error,
        result={"ok": True} if status is JobState.SUCCEEDED else None,
        progress_percent=40.0,
        progress_message="going",
    )
    resource = resource_document(job, "ws://progress.test")
    event = event_fields(job, "state")
    assert {name: resource[name] for name in SHARED} == {name: event[name] for name in SHARED}
    assert resource["status"] == status.value
    # The last attempt's error whenever the job has one: also queued again after a failed or handed-back
    # attempt, and running the next one.
    assert resource["error"] == event["error"] == error
    # The documents are what their models say.
    assert job_resource(job, "ws://progress.test").model_dump(mode="json")["error"] == error
    assert event_for(job, "state").error == error


def test_a_result_is_shown_only_once_succeeded() -> None:
    # A succeeded job's result only: a result column left over by any other state is not the job's.
    for status in JobState:
        job = replace(JOB, status=status, result={"ok": True})
        shown = {"ok": True} if status is JobState.SUCCEEDED else None
        assert resource_document(job, "ws://progress.test")["result"] == event_fields(job, "state")["result"]
        assert event_fields(job, "state")["result"] == shown


def test_the_dead_letter_shows_the_error_and_labels_of_the_job_resource() -> None:
    failed = replace(JOB, status=JobState.FAILED, error=ERROR, finished_at=AT, attempts=3)
    letter = dead_letter_for(failed)
    resource = resource_document(failed, "ws://progress.test")
    assert (letter.error, letter.labels) == (resource["error"], resource["labels"])
    assert (letter.attempts, letter.max_attempts, letter.failed_at) == (3, 3, AT)


def test_an_event_says_when_a_job_runs_only_while_it_is_scheduled() -> None:
    for status in JobState:
        job = replace(JOB, status=status, run_at=AT)
        assert event_fields(job, "state")["run_at"] == (AT if status is JobState.SCHEDULED else None)
        assert resource_document(job, "ws://progress.test")["run_at"] == "2026-12-01T09:00:00Z"
