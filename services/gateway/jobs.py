"""The job resources: submission (202 + Location), the status monitor, result, cancel, the list, and
the job types."""

from __future__ import annotations

import functools
import math
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from conveyor import changes
from conveyor.changes import ChangeResult, IdempotencyClaim, NewJob, Outcome
from conveyor.idempotency import MAX_KEY_LENGTH, fingerprint, parse_key
from conveyor.jobstore import get_job, is_job_id, list_jobs
from conveyor.jsoncodec import FastJSONResponse
from conveyor.lifecycle import JobState
from conveyor.models import JobRecord, utcnow
from conveyor.pages import encoded_within, page_response
from conveyor.problems import PROBLEM_JSON, Problem, invalid_field, invalid_request, job_not_found
from conveyor.schemas import (
    MAX_BATCH_JOBS,
    SUBMISSION_EXAMPLES,
    BatchAccepted,
    BatchSubmission,
    JobPage,
    JobResource,
    JobSubmission,
    JobTypeInfo,
    RetryRequest,
    inlined_schema,
    job_path,
    resource_document,
)
from conveyor.settings import DEFAULT_RETRY_AFTER_S, TenantLimits
from conveyor.topics import HIGHEST_PRIORITY, LOWEST_PRIORITY
from services.gateway.bodylimit import MAX_BATCH_BODY_BYTES
from services.gateway.limits import queue_full, too_large_for_burst
from services.gateway.listing import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    decode_cursor,
    encode_cursor,
    job_filter,
    next_page_url,
)
from services.gateway.security import require_principal
from services.gateway.state import GatewayState, gateway_state
from services.gateway.submission import Submission, read_batch, read_submission

# `?wait=` holds a status request at most this long.
MAX_WAIT_S = 60.0
PriorityLevel = Annotated[int, Field(ge=HIGHEST_PRIORITY, le=LOWEST_PRIORITY)]
# No NUL: PostgreSQL refuses it in text, so it would fail the query rather than match nothing.
TypeName = Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")]
LabelFilter = Annotated[str, Field(max_length=320, pattern=r"^[^\x00]*$")]
# A header that tells a client its submission was answered from an earlier one with the same key.
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_HEADER = "Idempotency-Key"

router = APIRouter(prefix="/v1")


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed JSON",
        401: "Missing or unknown API key",
        403: "The API key lacks the scope",
        404: "No such job for this tenant",
        409: "The job's state does not allow this",
        413: "The body, or the payload, is over its limit (`CONVEYOR_MAX_PAYLOAD_BYTES`)",
        415: "Not JSON",
        422: "Invalid request: the `errors` member names each field at fault",
        429: "Over the tenant's limit; retry after `Retry-After` seconds",
        503: "A dependency is down; retry after `Retry-After` seconds",
    }
    return {
        code: {"description": descriptions[code], "content": {PROBLEM_JSON: {}}}
        for code in (401, 403, 503, *codes)
    }


JOB_EXAMPLE: dict[str, Any] = {
    "id": "0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10",
    "type": "demo.sleep",
    "status": "queued",
    "priority": 3,
    "attempts": 0,
    "max_attempts": 3,
    "labels": {"customer": "acme"},
    "run_at": None,
    "timeout_s": None,
    "created_at": "2026-11-24T10:00:00Z",
    "updated_at": "2026-11-24T10:00:00Z",
    "started_at": None,
    "finished_at": None,
    "progress": {"percent": None, "message": None},
    "result": None,
    "error": None,
    "links": {
        "self": "/v1/jobs/0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10",
        "events": "ws://127.0.0.1:8001/v1/jobs/0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10/events",
        "cancel": "/v1/jobs/0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10/cancel",
        "result": None,
    },
}
ACCEPTED_HEADERS = {
    "Location": {"description": "The job's status monitor", "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds to wait before polling it", "schema": {"type": "integer"}},
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobResource,
    responses={
        202: {
            "description": "Accepted: the job is recorded and will run; poll `Location`.",
            "headers": ACCEPTED_HEADERS,
            "content": {"application/json": {"example": JOB_EXAMPLE}},
        },
        **problems(400, 413, 415, 422, 429),
    },
    openapi_extra={
        "parameters": [
            {
                "name": IDEMPOTENCY_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": MAX_KEY_LENGTH + 2},
                "description": "Retry safely: the same key and body within the window (24 h by default)"
                " return the same job; the same key with another body is refused (422). Scoped to the"
                " tenant.",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": JobSubmission.model_json_schema(),
                    "examples": SUBMISSION_EXAMPLES,
                }
            },
        },
    },
)
async def submit_job(request: Request) -> JSONResponse:
    """Accept a job: answers 202 once the job is committed, with `Location` to poll."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "submit")
    key = None
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    if idempotency_key is not None:
        key = parse_key(idempotency_key)
        if key is None:
            raise invalid_field("Idempotency-Key", f"1 to {MAX_KEY_LENGTH} printable ASCII characters")
    settings = state.settings
    body, submission = await read_submission(request, state.registry, settings.max_payload_bytes)
    limits = state.settings.limits_for(principal.tenant)
    state.limiter.admit(principal.tenant, limits)
    job = _new_job(state, principal.tenant, submission, limits, key, body)
    # Written in the next batch with everything else this gateway accepts meanwhile; the job's event
    # and message are staged in the same transaction, so once committed the relay publishes them even
    # if this process dies right after answering.
    [result] = await state.committer.apply([job])
    if result.outcome is Outcome.WRITTEN:
        return _accepted(state, _written(result))
    if result.outcome is Outcome.REPLAYED:
        response = _accepted(state, _written(result))
        response.headers[REPLAYED_HEADER] = "true"
        return response
    raise _refusal(result, limits, "Idempotency-Key")


def _new_job(
    state: GatewayState,
    tenant: str,
    submission: Submission,
    limits: TenantLimits,
    key: str | None,
    body: Any,
) -> NewJob:
    request = submission.request
    # The fingerprint of the body only when there is a key to hold it: hashing costs on every request.
    claim = IdempotencyClaim(key, fingerprint(body), state.settings.idempotency_window_s) if key else None
    return NewJob(
        tenant=tenant,
        type=request.type,
        payload=submission.payload,
        priority=request.priority,
        max_attempts=request.max_attempts or default_attempts(state, request.type),
        labels=request.labels,
        run_at=submission.run_at,
        timeout_s=request.timeout_s,
        idempotency=claim,
        max_queued=limits.max_queued,
    )


def _written(result: ChangeResult) -> JobRecord:
    """The job a result answers with (a written or replayed job, or the row a stale change found)."""
    if result.job is None:
        # The write path answers these outcomes with the job; without one there is nothing to show.
        raise RuntimeError(f"a {result.outcome.value} change result without its job")
    return result.job


def _refusal(result: ChangeResult, limits: TenantLimits, key_field: str) -> Problem:
    """The problem that answers a new job the write path refused."""
    if result.outcome is Outcome.OVER_QUOTA:
        return queue_full(result.waiting or 0, limits)
    if result.outcome is Outcome.KEY_REUSED:
        return Problem(
            422,
            "Idempotency key reused",
            "this idempotency key was used with a different request body",
            slug="idempotency-key-reused",
            errors=[{"field": key_field, "message": "already used with a different body"}],
        )
    if result.outcome is Outcome.KEY_ORPHANED:  # jobs are never deleted: a key whose job is gone by hand
        return invalid_field(key_field, "the job this key created no longer exists; use a new key")
    # ABANDONED: the job was answered from another request of the same moment that did not go through.
    return Problem(
        409, "Conflict", "a concurrent request with the same idempotency key failed; retry", slug="conflict"
    )


@router.post(
    "/jobs/batch",
    status_code=202,
    response_model=BatchAccepted,
    responses={
        202: {"description": "Accepted: every job is recorded and will run; poll each `links.self`."},
        **problems(400, 413, 415, 422, 429),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": f"Up to {MAX_BATCH_JOBS} jobs and {MAX_BATCH_BODY_BYTES // (1024 * 1024)} MiB.",
            "content": {"application/json": {"schema": inlined_schema(BatchSubmission)}},
        }
    },
)
async def submit_batch(
    request: Request,
) -> JSONResponse:
    """Accept up to 1,000 jobs at once, atomically: all are created (202, in request order) or none
    (a 422 naming each item and field at fault, e.g. `jobs[3].type`; a 429 if the tenant's rate or
    queue limit cannot take them all). Each item may carry its own `idempotency_key`; an item whose key
    was used before with the same job is answered with that job and not created again."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "submit")
    if "idempotency-key" in request.headers:
        raise invalid_field("Idempotency-Key", "a batch takes an `idempotency_key` per job, not the header")
    items = await read_batch(request, state.registry, state.settings.max_payload_bytes)
    limits = state.settings.limits_for(principal.tenant)
    if len(items) > limits.submit_burst:
        raise too_large_for_burst(len(items), limits)
    state.limiter.admit(principal.tenant, limits, count=len(items))
    jobs = [
        _new_job(state, principal.tenant, submission, limits, submission.key, item)
        for item, submission in items
    ]
    results = await state.committer.apply(jobs, atomic=True)
    refused = [(n, result) for n, result in enumerate(results) if result.outcome not in ANSWERED]
    if refused:
        raise _batch_refusal(refused, limits)
    written = [_written(result) for result in results]
    body = {
        "items": [resource_document(job, state.settings.progress_url) for job in written],
        "replayed": [n for n, result in enumerate(results) if result.outcome is Outcome.REPLAYED],
    }
    retry_after = min(retry_after_s(job) for job in written)
    return FastJSONResponse(body, status_code=202, headers={"Retry-After": str(retry_after)})


# The outcomes of a new job that answer with a job.
ANSWERED = frozenset({Outcome.WRITTEN, Outcome.REPLAYED})


def _batch_refusal(refused: list[tuple[int, ChangeResult]], limits: TenantLimits) -> Problem:
    """Why a batch was refused: the tenant's queue limit, or the items whose keys do not fit."""
    causes = [(n, result) for n, result in refused if result.outcome is not Outcome.ABANDONED]
    for _, result in causes:
        if result.outcome is Outcome.OVER_QUOTA:
            return queue_full(result.waiting or 0, limits, wanted=len(refused))
    errors = []
    for n, result in causes:
        problem = _refusal(result, limits, f"jobs[{n}].idempotency_key")
        errors.extend(problem.extensions.get("errors", []))
    if not errors:
        return _refusal(refused[0][1], limits, "jobs")
    return invalid_request(errors)


def _accepted(state: GatewayState, job: JobRecord) -> JSONResponse:
    return FastJSONResponse(
        resource_document(job, state.settings.progress_url),
        status_code=202,
        headers={"Location": job_path(job.id), "Retry-After": str(retry_after_s(job))},
    )


def retry_after_s(job: JobRecord) -> int:
    """When a poll could show something new: a scheduled job's start time, else soon."""
    if job.status == JobState.SCHEDULED and job.run_at is not None:
        return max(DEFAULT_RETRY_AFTER_S, math.ceil((job.run_at - utcnow()).total_seconds()))
    return DEFAULT_RETRY_AFTER_S


@router.get(
    "/jobs",
    response_model=JobPage,
    responses=problems(422),
)
async def list_tenant_jobs(
    request: Request,
    status: list[JobState] = Query(default=[], description="Any of these statuses (repeat the parameter)."),
    type: list[TypeName] = Query(default=[], description="Any of these job types."),
    priority: list[PriorityLevel] = Query(default=[], description="Any of these priorities."),
    label: list[LabelFilter] = Query(default=[], description="`key=value`; every one given must match."),
    created_after: datetime | None = Query(default=None, description="Created at or after this time."),
    created_before: datetime | None = Query(default=None, description="Created before this time."),
    limit: int = Query(default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
    cursor: str | None = Query(default=None, max_length=500, description="`next_cursor` of the last page."),
) -> Response:
    """The tenant's jobs, newest first, filtered, a page at a time: up to `limit` jobs, fewer when
    they would take more than CONVEYOR_MAX_PAGE_BYTES (then `next_cursor` goes on from the last shown)."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    for name, moment in (("created_after", created_after), ("created_before", created_before)):
        if moment is not None and moment.tzinfo is None:
            raise invalid_field(name, "give a time with a UTC offset, e.g. 2026-11-24T10:00:00Z")
    where = job_filter(status, type, priority, label, created_after, created_before)
    before = decode_cursor(cursor) if cursor is not None else None
    jobs = await state.db.read(
        functools.partial(list_jobs, tenant=principal.tenant, where=where, limit=limit + 1, before=before)
    )
    documents = (resource_document(job, state.settings.progress_url) for job in jobs[:limit])
    items = encoded_within(documents, state.settings.max_page_bytes)
    # More after this page: a job past `limit`, or jobs the page had no room for (max_page_bytes).
    more = len(jobs) > len(items)
    next_cursor = encode_cursor(jobs[len(items) - 1]) if more else None
    fields = {
        "next_cursor": next_cursor,
        "next": next_page_url(request.url.path, request.query_params.multi_items(), next_cursor)
        if next_cursor
        else None,
    }
    return page_response(fields, "items", items)


@router.get(
    "/jobs/{job_id}",
    response_model=JobResource,
    responses={
        200: {"content": {"application/json": {"example": JOB_EXAMPLE}}},
        **problems(404, 422),
    },
)
async def read_job(
    request: Request,
    job_id: str,
    wait: float = Query(
        default=0,
        ge=0,
        le=MAX_WAIT_S,
        description="Hold the request up to this many seconds until the job changes state.",
    ),
) -> JSONResponse:
    """The status monitor: status, latest progress, and the result or error once done."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    job = await _tenant_job(state, principal.tenant, job_id)
    if wait > 0 and not job.status.is_terminal:
        # Served from the events topic, not by polling the database (services.gateway.waiting).
        max_waiting = state.settings.tenant_max_waiting
        disconnected = functools.partial(_disconnected, request)
        job = await state.waits.until_changed(job, principal.tenant, wait, max_waiting, disconnected)
    headers = {} if job.status.is_terminal else {"Retry-After": str(retry_after_s(job))}
    return FastJSONResponse(resource_document(job, state.settings.progress_url), headers=headers)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (a GET's body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.get(
    "/jobs/{job_id}/result",
    responses={
        200: {
            "description": "The job's result, as its handler returned it",
            "content": {"application/json": {}},
        },
        **problems(404, 409),
    },
)
async def read_result(
    request: Request,
    job_id: str,
) -> JSONResponse:
    """The result of a succeeded job; a 409 problem saying why there is none otherwise."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "read")
    job = await _tenant_job(state, principal.tenant, job_id)
    status = job.status
    if status is JobState.SUCCEEDED:
        return FastJSONResponse(job.result)
    if status is JobState.FAILED:
        raise Problem(
            409, "Job failed", "the job failed; it has no result", slug="job-failed", error=job.error
        )
    if status is JobState.CANCELED:
        raise Problem(409, "Job canceled", "the job was canceled; it has no result", slug="job-canceled")
    raise Problem(
        409,
        "Result not ready",
        f"the job is {status}; poll its status monitor",
        slug="result-not-ready",
        headers={"Retry-After": str(retry_after_s(job)), "Location": job_path(job.id)},
        job_status=status,
    )


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    response_model=JobResource,
    responses={
        202: {
            "description": "Canceled: it will not run, or its handler is told to stop",
            "headers": ACCEPTED_HEADERS,
        },
        **problems(404, 409),
    },
)
async def cancel(
    request: Request,
    job_id: str,
) -> JSONResponse:
    """Cancel a job: a scheduled or queued job never runs; a running job's handler is told to stop.
    The job ends `canceled`. 409 if it has already finished."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "cancel")
    if not is_job_id(job_id):
        raise _not_found(job_id)
    [result] = await state.committer.apply([changes.cancel(job_id, principal.tenant)])
    if result.outcome is Outcome.NOT_FOUND:
        raise _not_found(job_id)
    canceled = _written(result)
    if result.outcome is not Outcome.WRITTEN:
        raise Problem(
            409,
            "Job already finished",
            f"the job is {canceled.status}",
            slug="job-finished",
            job_status=canceled.status,
        )
    return FastJSONResponse(
        resource_document(canceled, state.settings.progress_url),
        status_code=202,
        headers={"Location": job_path(job_id)},
    )


@router.post(
    "/jobs/{job_id}/retry",
    status_code=202,
    response_model=JobResource,
    responses={
        202: {"description": "Queued again, with more attempts", "headers": ACCEPTED_HEADERS},
        **problems(404, 409, 422, 429),
    },
)
async def retry(
    request: Request,
    job_id: str,
    body: Annotated[RetryRequest | None, Body()] = None,
) -> JSONResponse:
    """Run a failed job again: it is queued at once with `attempts` more attempts (by default as many
    as a new job of its type gets). Its attempt numbers go on counting and its last error stays until
    the next attempt ends. Needs the `submit` scope; 409 unless the job is `failed`."""
    state = gateway_state(request)
    principal = await require_principal(request, state, "submit")
    job = await _tenant_job(state, principal.tenant, job_id)
    more = body.attempts if body is not None and body.attempts is not None else None
    limits = state.settings.limits_for(principal.tenant)
    change = changes.retry(job, more or default_attempts(state, job.type), max_queued=limits.max_queued)
    [result] = await state.committer.apply([change])
    if result.outcome is Outcome.NOT_FOUND:
        raise _not_found(job_id)
    still_failed = result.job is not None and result.job.status == JobState.FAILED
    if result.outcome is Outcome.OVER_QUOTA and still_failed:
        raise queue_full(result.waiting or 0, limits)
    if result.outcome is not Outcome.WRITTEN:  # not failed, or retried by a racing request a moment ago
        status = result.job.status if result.job is not None else job.status
        raise Problem(
            409,
            "Job not failed",
            f"only a failed job can be retried; this one is {status}",
            slug="job-not-failed",
            job_status=status,
        )
    retried = _written(result)
    return FastJSONResponse(
        resource_document(retried, state.settings.progress_url),
        status_code=202,
        headers={"Location": job_path(job_id), "Retry-After": str(retry_after_s(retried))},
    )


def default_attempts(state: GatewayState, type_name: str) -> int:
    """How many attempts a new job of this type gets, unless its submission says: the type's, else the
    setting's (also when the type is no longer registered, for a retry of an old job)."""
    job_type = state.registry.types.get(type_name)
    return (job_type.max_attempts if job_type is not None else None) or state.settings.default_max_attempts


@router.get("/job-types", response_model=list[JobTypeInfo], responses=problems())
async def list_job_types(request: Request) -> list[JobTypeInfo]:
    """The registered job types and the JSON Schema of their payloads. Needs the `read` scope."""
    state = gateway_state(request)
    await require_principal(request, state, "read")
    return [
        JobTypeInfo(name=t.name, description=t.description, payload_schema=t.payload_schema())
        for t in (state.registry.get(name) for name in state.registry.names())
    ]


async def _tenant_job(state: GatewayState, tenant: str, job_id: str) -> JobRecord:
    job = await state.db.read(functools.partial(get_job, tenant=tenant, job_id=job_id))
    if job is None:
        raise _not_found(job_id)
    return job


def _not_found(job_id: str) -> Problem:
    return job_not_found(f"no job {job_id!r}")
