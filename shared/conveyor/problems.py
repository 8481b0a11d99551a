"""RFC 9457 problem details: every HTTP error a service answers is `application/problem+json`."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger(__name__)

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:conveyor:problem:"
# Where the problem a request was answered with is left in its ASGI scope, for the HTTP metrics
# (`conveyor.httpmetrics`: a 429's `limit` is the reason a submission was refused).
PROBLEM_SCOPE_KEY = "conveyor.problem"
# How long a client should wait before retrying while a dependency is down.
DEPENDENCY_RETRY_AFTER_S = 5
# SQLSTATE classes (and one code) of PostgreSQL errors that mean "the database cannot serve now", not
# "this request is wrong": connection exceptions, insufficient resources (too many connections),
# operator intervention (shutting down, starting up), system errors, and 55000, which is what a
# database refusing connections (`ALLOW_CONNECTIONS false`) raises.
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")
UNAVAILABLE_SQLSTATES = ("55000",)


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = PROBLEM_TYPE_BASE + slug if slug else "about:blank"
        self.headers = headers or {}
        self.extensions = extensions

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        body.update(self.extensions)
        return body


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(
        problem.body(instance), status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON
    )


def field_errors(
    errors: list[ErrorDetails] | list[Any], prefix: tuple[str | int, ...] = ()
) -> list[dict[str, str]]:
    """Pydantic errors as `[{"field": "payload.seconds", "message": ...}]`; list items by position, as
    in `jobs[3].type`."""
    fields = []
    for error in errors:
        loc = [part for part in (*prefix, *error.get("loc", ())) if part != "body"]
        fields.append({"field": field_name(loc), "message": error["msg"]})
    return fields


def field_name(loc: list[str | int] | tuple[str | int, ...]) -> str:
    """`("jobs", 3, "type")` -> `jobs[3].type`."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or "(body)"


def validation_problem(
    exc: ValidationError | list[ErrorDetails], prefix: tuple[str | int, ...] = ()
) -> Problem:
    return invalid_request(field_errors(exc.errors() if isinstance(exc, ValidationError) else exc, prefix))


def invalid_field(field: str, message: str) -> Problem:
    """A 422 for one field checked by hand rather than by a pydantic model."""
    return invalid_request([{"field": field, "message": message}])


def invalid_request(errors: list[dict[str, str]]) -> Problem:
    fields = ", ".join(error["field"] for error in errors)
    return Problem(422, "Invalid request", f"invalid: {fields}", slug="invalid-request", errors=errors)


UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="conveyor"'}


def unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, slug="unauthorized", headers=UNAUTHORIZED_HEADERS)


def forbidden(scope: str) -> Problem:
    return Problem(403, "Forbidden", f"this API key lacks the {scope!r} scope", slug="forbidden")


def job_not_found(detail: str) -> Problem:
    """No such job for this tenant: one problem type on every service (another tenant's job is
    answered exactly like a job that does not exist)."""
    return Problem(404, "Not found", detail, slug="job-not-found")


def too_many_requests(detail: str, retry_after_s: int, limit: str) -> Problem:
    """A 429 for a client over one of its limits; `limit` names which."""
    return Problem(
        429,
        "Too many requests",
        detail,
        slug="rate-limited",
        headers={"Retry-After": str(max(1, retry_after_s))},
        limit=limit,
    )


def dependency_down(name: str) -> Problem:
    return Problem(
        503,
        "Service unavailable",
        f"the {name} is unreachable; nothing was accepted, retry later",
        slug="dependency-unavailable",
        headers={"Retry-After": str(DEPENDENCY_RETRY_AFTER_S)},
    )


def database_unavailable(exc: DBAPIError) -> bool:
    """Whether a database error means the database is down or refusing, rather than a bad request."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
    return sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES or sqlstate in UNAVAILABLE_SQLSTATES


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        request.scope[PROBLEM_SCOPE_KEY] = exc
        return problem_response(exc, request)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        problem = Problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return problem_response(problem, request)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(list(exc.errors())), request)

    async def on_database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("http.database_unavailable", error=str(exc))
        return problem_response(dependency_down("database"), request)

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DBAPIError)
        if database_unavailable(exc):
            return await on_database_down(request, exc)
        return await on_unexpected(request, exc)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http.unexpected_error", path=request.url.path)
        return problem_response(Problem(500, "Internal error", slug="internal"), request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for error in (OperationalError, InterfaceError, PoolTimeout, ConnectionError, TimeoutError):
        app.add_exception_handler(error, on_database_down)
    app.add_exception_handler(DBAPIError, on_database_error)
    app.add_exception_handler(Exception, on_unexpected)
