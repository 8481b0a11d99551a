"""The job resources: submission (202 + Location), the status monitor, and the job types."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from conveyor.auth import Principal
from conveyor.handlers import JobType, UnknownJobType
from conveyor.jobstore import announce, enqueue, get_job, insert_job
from conveyor.lifecycle import JobState
from conveyor.problems import PROBLEM_JSON, Problem, validation_problem
from conveyor.schemas import JobResource, JobSubmission, JobTypeInfo, job_path, job_resource
from conveyor.settings import DEFAULT_RETRY_AFTER_S
from services.gateway.security import require_principal, require_scope
from services.gateway.state import GatewayState, gateway_state

MAX_BODY_BYTES = 1024 * 1024
JSON_TYPES = ("application/json",)

router = APIRouter(prefix="/v1")

PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": description, "content": {PROBLEM_JSON: {}}}
    for code, description in [
        (401, "Missing or unknown API key"),
        (403, "The API key lacks the scope"),
        (422, "Invalid request: the `errors` member names each field at fault"),
        (503, "A dependency is down; retry after `Retry-After` seconds"),
    ]
}


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobResource,
    responses={
        **PROBLEM_RESPONSES,
        400: {"description": "Malformed JSON", "content": {PROBLEM_JSON: {}}},
        415: {"description": "Not JSON", "content": {PROBLEM_JSON: {}}},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSubmission"}}},
        }
    },
)
async def submit_job(
    request: Request,
    principal: Principal = Depends(require_principal),
    state: GatewayState = Depends(gateway_state),
) -> JSONResponse:
    """Accept a job: answers 202 once the job is committed, with `Location` to poll."""
    require_scope(principal, "submit")
    submission = parse_submission(await read_json_body(request))
    job_type = find_job_type(state, submission.type)
    payload = validate_payload(job_type, submission.payload)
    async with state.db.session() as session:
        job = await insert_job(
            session,
            tenant=principal.tenant,
            type=submission.type,
            payload=payload,
            priority=submission.priority,
            max_attempts=submission.max_attempts
            or job_type.max_attempts
            or state.settings.default_max_attempts,
        )
        # Staged in the same transaction as the job: once committed, the relay will publish them
        # even if this process dies right after answering.
        rows = [
            announce(session, state.settings.topic_prefix, job, "state"),
            enqueue(session, state.settings.topic_prefix, job),
        ]
    state.relay.notify(rows)
    resource = job_resource(job, state.settings.progress_url)
    return JSONResponse(
        resource.model_dump(mode="json"),
        status_code=202,
        headers={"Location": job_path(job.id), "Retry-After": str(DEFAULT_RETRY_AFTER_S)},
    )


@router.get(
    "/jobs/{job_id}",
    response_model=JobResource,
    responses={
        **PROBLEM_RESPONSES,
        404: {"description": "No such job for this tenant", "content": {PROBLEM_JSON: {}}},
    },
)
async def read_job(
    job_id: str,
    principal: Principal = Depends(require_principal),
    state: GatewayState = Depends(gateway_state),
) -> JSONResponse:
    """The status monitor: status, latest progress, and the result or error once done."""
    require_scope(principal, "read")
    async with state.db.reading() as session:
        job = await get_job(session, principal.tenant, job_id)
    if job is None:
        raise Problem(404, "Not found", f"no job {job_id!r}", slug="job-not-found")
    headers = {} if JobState(job.status).is_terminal else {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}
    resource = job_resource(job, state.settings.progress_url)
    return JSONResponse(resource.model_dump(mode="json"), headers=headers)


@router.get("/job-types", response_model=list[JobTypeInfo], responses=PROBLEM_RESPONSES)
async def list_job_types(
    principal: Principal = Depends(require_principal),
    state: GatewayState = Depends(gateway_state),
) -> list[JobTypeInfo]:
    """The registered job types and the JSON Schema of their payloads."""
    return [
        JobTypeInfo(name=t.name, description=t.description, payload_schema=t.payload_schema())
        for t in (state.registry.get(name) for name in state.registry.names())
    ]


async def read_json_body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise Problem(
            415,
            "Unsupported media type",
            "send the job as `Content-Type: application/json`",
            slug="unsupported-media-type",
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise Problem(
                413, "Content too large", f"the body exceeds {MAX_BODY_BYTES} bytes", slug="body-too-large"
            )
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Problem(400, "Malformed JSON", str(exc), slug="malformed-json") from None


def parse_submission(body: Any) -> JobSubmission:
    try:
        return JobSubmission.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def find_job_type(state: GatewayState, name: str) -> JobType:
    try:
        return state.registry.get(name)
    except UnknownJobType as exc:
        raise Problem(
            422,
            "Unknown job type",
            f"{name!r} is not a registered job type",
            slug="unknown-job-type",
            errors=[{"field": "type", "message": f"unknown job type; known: {', '.join(exc.known)}"}],
            known_types=exc.known,
        ) from None


def validate_payload(job_type: JobType, payload: Any) -> Any:
    """The payload as stored: validated, and normalized (defaults filled) by the type's model."""
    try:
        validated = job_type.validate_payload(payload)
    except ValidationError as exc:
        raise validation_problem(exc, prefix=("payload",)) from None
    if job_type.payload_model is None:
        return validated
    return validated.model_dump(mode="json")
