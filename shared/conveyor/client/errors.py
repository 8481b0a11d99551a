"""The API's problem documents (RFC 9457) as exceptions: one class per kind of answer, each carrying
the problem it was raised from."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import httpx

from conveyor.client.models import JobError

PROBLEM_TYPE_BASE = "urn:conveyor:problem:"


@dataclass(frozen=True)
class Problem:
    """A problem document: `status`, `title`, `detail`, `type`, and the whole body with its extensions."""

    status: int
    title: str
    detail: str | None = None
    type: str = "about:blank"
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """Conveyor's own name for the problem (`job-not-found`), or "" for a generic one."""
        return self.type.removeprefix(PROBLEM_TYPE_BASE) if self.type.startswith(PROBLEM_TYPE_BASE) else ""

    @classmethod
    def of(cls, response: httpx.Response) -> Problem:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):  # not a problem document: a proxy's page, say
            text = response.text.strip()[:200]
            return cls(response.status_code, response.reason_phrase or "Error", text or None)
        return cls(
            status=int(body.get("status") or response.status_code),
            title=str(body.get("title") or response.reason_phrase or "Error"),
            detail=body.get("detail"),
            type=str(body.get("type") or "about:blank"),
            body=body,
        )


class ConveyorError(Exception):
    """An error answer of the API (or no answer at all: `Unavailable`)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.title}: {problem.detail}" if problem.detail else problem.title)
        self.problem = problem

    @property
    def status(self) -> int:
        return self.problem.status


class Unauthorized(ConveyorError):
    """401: no API key, or an unknown or revoked one."""


class Forbidden(ConveyorError):
    """403: the key lacks the scope."""


class NotFound(ConveyorError):
    """404: no such job for this tenant."""


class MethodNotAllowed(ConveyorError):
    """405: the server has no such operation on this path (an older server, say)."""


class Conflict(ConveyorError):
    """409: the job's state does not allow this (cancel of a finished job, retry of one not failed)."""

    @property
    def job_status(self) -> str | None:
        status = self.problem.body.get("job_status")
        return str(status) if status is not None else None


class ResultNotReady(Conflict):
    """409 `result-not-ready`: the job has not finished yet."""


class JobFailed(Conflict):
    """The job failed: `error` is its last attempt's."""

    @property
    def error(self) -> JobError | None:
        error = self.problem.body.get("error")
        return JobError.model_validate(error) if isinstance(error, dict) else None


class JobCanceled(Conflict):
    """The job was canceled: it has no result."""


class ValidationFailed(ConveyorError):
    """400, 413, 415 or 422: the request is wrong; `errors` names each field at fault."""

    @property
    def errors(self) -> list[dict[str, str]]:
        errors = self.problem.body.get("errors")
        return list(errors) if isinstance(errors, list) else []


class _RetryLater(ConveyorError):
    def __init__(self, problem: Problem, retry_after: float | None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class RateLimited(_RetryLater):
    """429: over one of the tenant's limits (`limit` names which); `retry_after` in seconds."""

    @property
    def limit(self) -> str | None:
        limit = self.problem.body.get("limit")
        return str(limit) if limit is not None else None


class Unavailable(_RetryLater):
    """503, or the service could not be reached: nothing was accepted."""


# A problem type that says more than its status.
BY_SLUG: dict[str, type[ConveyorError]] = {
    "result-not-ready": ResultNotReady,
    "job-failed": JobFailed,
    "job-canceled": JobCanceled,
}
BY_STATUS: dict[int, type[ConveyorError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: ValidationFailed,
    415: ValidationFailed,
    422: ValidationFailed,
}


def error_for(response: httpx.Response) -> ConveyorError:
    """The exception an error response stands for."""
    problem = Problem.of(response)
    if response.status_code == 429:
        return RateLimited(problem, retry_after_s(response))
    if response.status_code == 503:
        return Unavailable(problem, retry_after_s(response))
    kind = BY_SLUG.get(problem.slug) or BY_STATUS.get(response.status_code, ConveyorError)
    return kind(problem)


def unreachable(url: str, exc: Exception) -> Unavailable:
    """No answer at all: the connection failed or was cut."""
    detail = f"{url}: {type(exc).__name__}{f': {exc}' if str(exc) else ''}"
    return Unavailable(Problem(503, "Service unreachable", detail), None)


def retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (Conveyor sends delay-seconds); None if absent or not a number."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
