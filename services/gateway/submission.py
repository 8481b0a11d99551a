"""Reading a submission: the body (JSON; its size is limited before it is read, by
`services.gateway.bodylimit`), the request model, the job type, the payload against the type's model
and its size limit, and the schedule. Each step raises a problem naming the field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.handlers import JobType, Registry, UnknownJobType
from conveyor.jsoncodec import encoded
from conveyor.models import utcnow
from conveyor.problems import (
    Problem,
    field_errors,
    field_name,
    invalid_field,
    invalid_request,
    validation_problem,
)
from conveyor.schemas import MAX_BATCH_JOBS, MAX_SCHEDULE_AHEAD_S, BatchItem, JobSubmission

JSON_TYPES = ("application/json",)
# Deeper JSON than this is refused: real payloads are far shallower, and serializing it again (to the
# database, to Kafka) would recurse past Python's limit.
MAX_JSON_DEPTH = 100
# Where a submission sits in the request body: () for `POST /v1/jobs`, ("jobs", 3) in a batch.
Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Submission:
    """A submission that passed every check: what the gateway records."""

    request: JobSubmission
    job_type: JobType
    payload: Any
    run_at: datetime | None

    @property
    def key(self) -> str | None:
        """A batch item's own idempotency key."""
        return self.request.idempotency_key if isinstance(self.request, BatchItem) else None


async def read_submission(
    request: Request, registry: Registry, max_payload_bytes: int
) -> tuple[Any, Submission]:
    """The raw JSON body (for the idempotency fingerprint) and the checked submission."""
    body = await read_json_body(request)
    return body, checked_submission(parse_submission(body), registry, max_payload_bytes)


async def read_batch(
    request: Request, registry: Registry, max_payload_bytes: int
) -> list[tuple[Any, Submission]]:
    """Each job of a batch, with its raw JSON (for its idempotency fingerprint), all checked. Every
    item and field at fault is named in one 422 (`jobs[3].type`); nothing is accepted if one is."""
    body = await read_json_body(request)
    try:
        envelope = BatchEnvelope.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc) from None
    items: list[tuple[Any, Submission]] = []
    errors: list[dict[str, str]] = []
    for n, raw in enumerate(envelope.jobs):
        at = ("jobs", n)
        try:
            item = BatchItem.model_validate(raw)
            items.append((_without_key(raw), checked_submission(item, registry, max_payload_bytes, at)))
        except ValidationError as exc:
            errors.extend(field_errors(exc.errors(), prefix=at))
        except Problem as problem:
            errors.extend(problem.extensions.get("errors", []))
    if errors:
        raise invalid_request(errors)
    return items


class BatchEnvelope(BaseModel):
    """A batch's outer shape, read before its items (`BatchSubmission` documents the whole): each item is
    then checked on its own, so that the errors of all of them are named at once."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[Any] = Field(min_length=1, max_length=MAX_BATCH_JOBS)


def _without_key(item: Any) -> Any:
    """A batch item as its fingerprint sees it: the job, not the key it is filed under."""
    return {name: value for name, value in item.items() if name != "idempotency_key"}


def checked_submission(
    request: JobSubmission, registry: Registry, max_payload_bytes: int, at: Location = ()
) -> Submission:
    """A parsed submission's job type, payload and schedule checked; errors name fields under `at`.
    The payload comes back encoded (`jsoncodec.encoded`): it was measured so, and is stored so."""
    job_type = find_job_type(registry, request.type, at)
    payload = within_limit(validate_payload(job_type, request.payload, at), max_payload_bytes, at)
    return Submission(request, job_type, payload, scheduled_time(request, at))


def within_limit(payload: Any, max_bytes: int, at: Location = ()) -> Any:
    """The payload as JSON, if it is no larger than `max_bytes` (`CONVEYOR_MAX_PAYLOAD_BYTES`). It is
    measured as it will be stored and sent (a dead letter carries it), so it is encoded here, once."""
    document, size = encoded(payload)
    if size > max_bytes:
        raise Problem(
            413,
            "Payload too large",
            f"the payload is {size} bytes as JSON; at most {max_bytes} are accepted",
            slug="payload-too-large",
            errors=[{"field": field_name((*at, "payload")), "message": f"at most {max_bytes} bytes as JSON"}],
        )
    return document


async def read_json_body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise Problem(
            415,
            "Unsupported media type",
            "send the job as `Content-Type: application/json`",
            slug="unsupported-media-type",
        )
    body = await request.body()  # within the route's limit: the BodyLimit middleware saw to it
    try:
        document = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise malformed_json(str(exc)) from None
    except (ValueError, RecursionError) as exc:  # NaN, Infinity, 1e999, integers of thousands of digits
        raise malformed_json(str(exc) if isinstance(exc, ValueError) else "nested too deeply") from None
    check_json(document)
    return document


def malformed_json(detail: str) -> Problem:
    return Problem(400, "Malformed JSON", detail, slug="malformed-json")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is out of range")
    return number


def check_json(document: Any) -> None:
    """Refuse what JSON's grammar allows but nothing downstream can store or send back: nesting past
    MAX_JSON_DEPTH, and strings that are not Unicode text (lone surrogates, from `\\ud800` escapes)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise malformed_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((key, depth) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and not _is_text(value):
            raise malformed_json("a string holds a lone surrogate (\\ud800-\\udfff): not Unicode text")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_submission(body: Any) -> JobSubmission:
    try:
        return JobSubmission.model_validate(body)
    except ValidationError as exc:
        raise validation_problem(exc) from None


def find_job_type(registry: Registry, name: str, at: Location = ()) -> JobType:
    try:
        return registry.get(name)
    except UnknownJobType as exc:
        raise Problem(
            422,
            "Unknown job type",
            f"{name!r} is not a registered job type",
            slug="unknown-job-type",
            errors=[
                {
                    "field": field_name((*at, "type")),
                    "message": f"unknown job type; known: {', '.join(exc.known)}",
                }
            ],
            known_types=exc.known,
        ) from None


def validate_payload(job_type: JobType, payload: Any, at: Location = ()) -> Any:
    """The payload as stored: validated, and normalized (defaults filled) by the type's model."""
    try:
        validated = job_type.validate_payload(payload)
    except ValidationError as exc:
        raise validation_problem(exc, prefix=(*at, "payload")) from None
    if job_type.payload_model is None:
        return validated
    return validated.model_dump(mode="json")


def scheduled_time(submission: JobSubmission, at: Location = ()) -> datetime | None:
    """When the job may run: `run_at`, or now plus `delay_s`; None to run at once. A time in the
    past runs at once (clocks differ); one further ahead than the limit is refused."""
    if submission.run_at is not None and submission.delay_s is not None:
        raise invalid_field(field_name((*at, "delay_s")), "give either `run_at` or `delay_s`, not both")
    if submission.delay_s is not None:
        return utcnow() + timedelta(seconds=submission.delay_s)
    if submission.run_at is None or submission.run_at <= utcnow():
        return None
    if submission.run_at - utcnow() > timedelta(seconds=MAX_SCHEDULE_AHEAD_S):
        raise invalid_field(
            field_name((*at, "run_at")), f"at most {MAX_SCHEDULE_AHEAD_S / 86400:g} days ahead"
        )
    return submission.run_at
