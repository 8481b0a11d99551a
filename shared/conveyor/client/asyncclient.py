"""`AsyncClient`: the API's every call, on httpx (HTTP) and websockets (live events).

`Client` (conveyor.client.syncclient) runs these same methods on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import httpx

from conveyor.client.config import DEFAULT_TIMEOUT_S, default_key, default_url
from conveyor.client.errors import ConveyorError, MethodNotAllowed, NotFound, error_for, unreachable
from conveyor.client.models import Event, Job, JobPage, JobType, Stats, Submission
from conveyor.client.retrying import RetryPolicy, retryable
from conveyor.client.streaming import DEFAULT_RECONNECT_WITHIN_S, job_events

# The server holds a `?wait=` request at most this long; a longer wait is several of them.
MAX_WAIT_S = 60.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
IDEMPOTENCY_HEADER = "Idempotency-Key"

OneOrMany = str | Sequence[str]


class AsyncClient:
    """A client of one Conveyor gateway, as one API key's tenant.

    `base_url` defaults to `CONVEYOR_URL` (else http://127.0.0.1:8000), `api_key` to
    `CONVEYOR_API_KEY`. `events_url`, the progress service's base URL (`ws://host:8001`), is only
    needed to override the `links.events` the gateway hands out. `retry` says how failed connections,
    503s and 429s are retried.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        events_url: str | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        key = api_key if api_key is not None else default_key()
        if not key:
            raise ValueError("no API key: pass api_key= or set CONVEYOR_API_KEY")
        self.base_url = (base_url or default_url()).rstrip("/")
        self.api_key = key
        self.timeout = timeout
        self.events_url = events_url.rstrip("/") if events_url else None
        self.retry_policy = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": "conveyor-client"},
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # --- Submitting ---

    async def submit(
        self,
        type: str,
        payload: Any | None = None,
        *,
        priority: int | None = None,
        labels: Mapping[str, str] | None = None,
        delay_s: float | None = None,
        run_at: datetime | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job; the job as accepted (202). Without `idempotency_key` one is made up, and sent
        again with every retry, so a retried submission never makes two jobs."""
        submission = Submission(
            type=type,
            payload=payload,
            priority=priority,
            labels=dict(labels) if labels is not None else None,
            delay_s=delay_s,
            run_at=run_at,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
        )
        key = idempotency_key or new_idempotency_key()
        response = await self._request(
            "POST", "/v1/jobs", json=submission.body(), headers={IDEMPOTENCY_HEADER: key}, repeatable=True
        )
        return Job.model_validate_json(response.content)

    async def submit_many(self, items: Iterable[Submission | Mapping[str, Any]]) -> builtins.list[Job]:
        """Submit up to 1,000 jobs at once (`POST /v1/jobs/batch`): all are created, in order, or none
        (the error says why). Each item without an `idempotency_key` gets one, so a retry is safe."""
        bodies = []
        for item in items:
            submission = item if isinstance(item, Submission) else Submission.model_validate(item)
            body = submission.body()
            body.setdefault("idempotency_key", new_idempotency_key())
            bodies.append(body)
        try:
            response = await self._request("POST", "/v1/jobs/batch", json={"jobs": bodies}, repeatable=True)
        except (NotFound, MethodNotAllowed) as exc:
            if exc.problem.slug:  # a problem of Conveyor's own, not a server without the route
                raise
            return await self._submit_each(bodies)
        return [Job.model_validate(item) for item in response.json()["items"]]

    async def _submit_each(self, bodies: builtins.list[dict[str, Any]]) -> builtins.list[Job]:
        """For a server without the batch endpoint: one submission after another, each with its key
        (not atomic: a failure leaves the jobs before it submitted, and a rerun replays them)."""
        jobs = []
        for body in bodies:
            key = body.pop("idempotency_key")
            response = await self._request(
                "POST", "/v1/jobs", json=body, headers={IDEMPOTENCY_HEADER: key}, repeatable=True
            )
            jobs.append(Job.model_validate_json(response.content))
        return jobs

    # --- Reading ---

    async def get(self, job_id: str) -> Job:
        response = await self._request("GET", f"/v1/jobs/{job_id}")
        return Job.model_validate_json(response.content)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:  # noqa: ASYNC109  # the API's name
        """The job once it has finished (succeeded, failed or canceled), long-polling `?wait=`;
        `TimeoutError` if it has not within `timeout` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        job = await self.get(job_id)
        while not job.finished:
            left = MAX_WAIT_S if deadline is None else deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:g} s")
            hold = min(MAX_WAIT_S, left)
            response = await self._request(
                "GET",
                f"/v1/jobs/{job_id}",
                params={"wait": f"{hold:.3f}"},
                timeout_s=hold + self.timeout,
            )
            job = Job.model_validate_json(response.content)
        return job

    async def result(self, job_id: str) -> Any:
        """The result of a succeeded job. `JobFailed` (with its `error`) or `JobCanceled` if it has
        none and never will; `ResultNotReady` if it has not finished."""
        response = await self._request("GET", f"/v1/jobs/{job_id}/result")
        return response.json()

    async def list(
        self,
        *,
        status: OneOrMany | None = None,
        type: OneOrMany | None = None,
        priority: int | Sequence[int] | None = None,
        label: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> AsyncIterator[Job]:
        """The tenant's jobs, newest first, every page (or the first `limit` jobs). A filter given
        several values matches any of them; every label given must match."""
        params: builtins.list[tuple[str, str]] = [
            *(("status", value) for value in _many(status)),
            *(("type", value) for value in _many(type)),
            *(("priority", str(value)) for value in _many(priority)),
            *(("label", f"{key}={value}") for key, value in (label or {}).items()),
        ]
        for name, moment in (("created_after", created_after), ("created_before", created_before)):
            if moment is not None:
                params.append((name, moment.isoformat()))
        left = limit
        cursor: str | None = None
        while left is None or left > 0:
            size = min(page_size, MAX_PAGE_SIZE, left if left is not None else MAX_PAGE_SIZE)
            query = [*params, ("limit", str(size)), *((("cursor", cursor),) if cursor else ())]
            response = await self._request("GET", "/v1/jobs", params=query)
            page = JobPage.model_validate_json(response.content)
            for job in page.items:
                yield job
            if left is not None:
                left -= len(page.items)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def types(self) -> builtins.list[JobType]:
        response = await self._request("GET", "/v1/job-types")
        return [JobType.model_validate(item) for item in response.json()]

    async def stats(self) -> Stats:
        """The tenant's queue: jobs waiting and running per priority, finished in the last minute."""
        response = await self._request("GET", "/v1/stats")
        return Stats.model_validate_json(response.content)

    # --- Changing ---

    async def cancel(self, job_id: str) -> Job:
        """Cancel the job (a running one's handler is told to stop); `Conflict` if it had finished."""
        response = await self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return Job.model_validate_json(response.content)

    async def retry(self, job_id: str, attempts: int | None = None) -> Job:
        """Run a failed job again, with `attempts` more attempts (default: as many as a new job of its
        type); `Conflict` if it has not failed."""
        body = {"attempts": attempts} if attempts is not None else None
        response = await self._request("POST", f"/v1/jobs/{job_id}/retry", json=body)
        return Job.model_validate_json(response.content)

    # --- Live events ---

    async def events(
        self,
        job: str | Job,
        after_seq: int | None = None,
        *,
        reconnect_within_s: float = DEFAULT_RECONNECT_WITHIN_S,
    ) -> AsyncIterator[Event]:
        """The job's snapshot (none when resuming after `after_seq`), then every event up to the
        terminal one, each once and in order, reconnecting with `after_seq` if the connection drops."""
        url = await self._events_url(job)
        stream = job_events(
            url,
            self.api_key,
            after_seq=after_seq,
            open_timeout_s=self.timeout,
            reconnect_within_s=reconnect_within_s,
        )
        async for event in stream:
            yield event

    async def _events_url(self, job: str | Job) -> str:
        if self.events_url is not None:
            job_id = job if isinstance(job, str) else job.id
            return f"{self.events_url}/v1/jobs/{job_id}/events"
        resource = job if isinstance(job, Job) else await self.get(job)
        if not resource.links.events:
            raise ValueError(f"job {resource.id} has no events link; pass events_url=")
        return resource.links.events

    # --- The wire ---

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        repeatable: bool | None = None,
    ) -> httpx.Response:
        """Send a request, retrying what `retry_policy` allows; the response, or the error it means."""
        again = method == "GET" if repeatable is None else repeatable
        retry = 0
        while True:
            error: ConveyorError | httpx.TransportError
            try:
                response = await self._http.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    headers=headers,
                    timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                error = exc
            else:
                if response.is_success:
                    return response
                error = error_for(response)
            retry += 1
            delay = self.retry_policy.delay_s(retry, error) if retryable(error, repeatable=again) else None
            if delay is None:
                if isinstance(error, httpx.TransportError):
                    raise unreachable(f"{method} {self.base_url}{path}", error) from error
                raise error
            await asyncio.sleep(delay)


def new_idempotency_key() -> str:
    return f"conveyor-client-{uuid.uuid4()}"


def _many(value: Any) -> builtins.list[Any]:
    if value is None:
        return []
    if isinstance(value, str | int):
        return [value]
    return list(value)
