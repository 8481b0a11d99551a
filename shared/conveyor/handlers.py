"""The handler SDK: teams register job types with `@job` and workers run them with a `JobContext`.

    from conveyor.handlers import JobContext, job

    class RenderIn(BaseModel):
        video_id: str

    @job("video.render", payload=RenderIn, max_attempts=5)
    async def render(ctx: JobContext, payload: RenderIn) -> dict[str, str]:
        await ctx.progress(percent=50, message="encoding")
        return {"url": "..."}

A plain (non-async) function runs in a thread, so it cannot block the worker's event loop. With
`process=True`, a plain function runs in the worker's pool of processes instead, for CPU-bound work;
it gets a `ProcessJobContext` (see `conveyor.processes`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from conveyor import processes
from conveyor.processes import ProcessJobContext

ProgressReporter = Callable[[float | None, str | None], Awaitable[None]]
Handler = Callable[..., Any]


class UnknownJobType(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown job type {name!r}")
        self.name = name
        self.known = known


@dataclass(frozen=True)
class JobType:
    name: str
    handler: Handler
    payload_model: type[BaseModel] | None = None
    max_attempts: int | None = None
    description: str = ""
    # Each attempt is stopped after this long unless the submission sets its own `timeout_s`.
    timeout_s: float | None = None
    # The backoff before a retry (see `conveyor.retries`); None means the worker's settings.
    retry_base_s: float | None = None
    retry_cap_s: float | None = None
    # Run in the worker's process pool (a plain, module-level function) rather than a thread.
    process: bool = False

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def validate_payload(self, payload: Any) -> Any:
        """The payload as the handler will get it; raises pydantic's ValidationError if invalid."""
        if self.payload_model is None:
            return payload
        return self.payload_model.model_validate(payload)

    def payload_schema(self) -> dict[str, Any]:
        if self.payload_model is None:
            return {}
        return self.payload_model.model_json_schema()


@dataclass
class Registry:
    types: dict[str, JobType] = field(default_factory=dict)

    def register(self, job_type: JobType) -> None:
        existing = self.types.get(job_type.name)
        if existing is not None and existing.handler is not job_type.handler:
            raise ValueError(f"job type {job_type.name!r} is registered twice")
        self.types[job_type.name] = job_type

    def get(self, name: str) -> JobType:
        try:
            return self.types[name]
        except KeyError:
            raise UnknownJobType(name, sorted(self.types)) from None

    def names(self) -> list[str]:
        return sorted(self.types)


# The process-wide registry that `@job` fills as handler modules are imported.
registry = Registry()


def job(
    name: str,
    *,
    payload: type[BaseModel] | None = None,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    retry_base_s: float | None = None,
    retry_cap_s: float | None = None,
    description: str = "",
    process: bool = False,
) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of job type `name`. `process=True` runs it in the
    worker's process pool: for CPU-bound work, which in a thread would contend with the event loop for
    the GIL."""

    def register(handler: Handler) -> Handler:
        if process:
            _check_process_handler(name, handler)
        doc = description or inspect.getdoc(handler) or ""
        registry.register(
            JobType(
                name,
                handler,
                payload,
                max_attempts,
                doc.split("\n\n")[0],
                timeout_s,
                retry_base_s=retry_base_s,
                retry_cap_s=retry_cap_s,
                process=process,
            )
        )
        return handler

    return register


def _check_process_handler(name: str, handler: Handler) -> None:
    """Fail at import, not at the first job: a child process imports its handler by name and calls it."""
    if inspect.iscoroutinefunction(handler):
        raise TypeError(f"job type {name!r}: a process handler must be a plain function, not async")
    if "<locals>" in getattr(handler, "__qualname__", "<locals>"):
        raise TypeError(f"job type {name!r}: a process handler must be defined at a module's top level")


def load_handler_modules(modules: list[str]) -> Registry:
    """Import the handler modules named in settings; their `@job` decorators fill `registry`."""
    for module in modules:
        importlib.import_module(module)
    return registry


class JobContext:
    """What a running handler gets: who it is, a way to report progress, and a cancellation flag."""

    def __init__(
        self, *, job_id: str, tenant: str, type: str, attempt: int, report: ProgressReporter
    ) -> None:
        self.job_id = job_id
        self.tenant = tenant
        self.type = type
        self.attempt = attempt
        self.cancelled = asyncio.Event()
        self.log = structlog.get_logger("conveyor.job").bind(job_id=job_id, type=type, attempt=attempt)
        self._report = report

    async def progress(
        self,
        percent: float | None = None,
        message: str | None = None,
        *,
        done: float | None = None,
        total: float | None = None,
    ) -> None:
        if percent is None and done is not None and total:
            percent = 100.0 * done / total
        if percent is not None:
            percent = max(0.0, min(100.0, float(percent)))
        await self._report(percent, message)


async def run_handler(job_type: JobType, ctx: JobContext, payload: Any) -> Any:
    """Run the handler: async ones on the loop, plain functions in a thread, or in the worker's process
    pool if registered with `process=True` (their result comes back in its JSON form)."""
    if job_type.process:
        return await processes.default_pool().run(job_type, ctx, payload)
    if job_type.is_async:
        return await job_type.handler(ctx, payload)
    return await asyncio.to_thread(job_type.handler, ctx, payload)


__all__ = [
    "JobContext",
    "JobType",
    "ProcessJobContext",
    "Registry",
    "UnknownJobType",
    "ValidationError",
    "job",
    "load_handler_modules",
    "registry",
    "run_handler",
]
