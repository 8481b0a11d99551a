"""`Client`: the blocking twin of `AsyncClient`, for scripts and synchronous applications.

It runs `AsyncClient`'s own methods on a private event loop (`asyncio.Runner`), so both behave alike
by construction. Call it from plain code, not from inside a running event loop (use `AsyncClient`
there).
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from conveyor.client.asyncclient import AsyncClient, OneOrMany
from conveyor.client.config import DEFAULT_TIMEOUT_S
from conveyor.client.models import Event, Job, JobType, Stats, Submission
from conveyor.client.retrying import RetryPolicy
from conveyor.client.streaming import DEFAULT_RECONNECT_WITHIN_S

T = TypeVar("T")


class Client:
    """A client of one Conveyor gateway; the arguments and methods are `AsyncClient`'s."""

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
        self._runner = asyncio.Runner()
        self._async = AsyncClient(
            base_url,
            api_key=api_key,
            timeout=timeout,
            events_url=events_url,
            retry=retry,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._async.base_url

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._run(self._async.close())
        finally:
            self._runner.close()

    def submit(
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
        return self._run(
            self._async.submit(
                type,
                payload,
                priority=priority,
                labels=labels,
                delay_s=delay_s,
                run_at=run_at,
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                idempotency_key=idempotency_key,
            )
        )

    def submit_many(self, items: Iterable[Submission | Mapping[str, Any]]) -> builtins.list[Job]:
        return self._run(self._async.submit_many(items))

    def get(self, job_id: str) -> Job:
        return self._run(self._async.get(job_id))

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        return self._run(self._async.wait(job_id, timeout))

    def result(self, job_id: str) -> Any:
        return self._run(self._async.result(job_id))

    def list(
        self,
        *,
        status: OneOrMany | None = None,
        type: OneOrMany | None = None,
        priority: int | Sequence[int] | None = None,
        label: Mapping[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        page_size: int = 50,
    ) -> Iterator[Job]:
        return self._iterate(
            self._async.list(
                status=status,
                type=type,
                priority=priority,
                label=label,
                created_after=created_after,
                created_before=created_before,
                limit=limit,
                page_size=page_size,
            )
        )

    def types(self) -> builtins.list[JobType]:
        return self._run(self._async.types())

    def stats(self) -> Stats:
        return self._run(self._async.stats())

    def cancel(self, job_id: str) -> Job:
        return self._run(self._async.cancel(job_id))

    def retry(self, job_id: str, attempts: int | None = None) -> Job:
        return self._run(self._async.retry(job_id, attempts))

    def events(
        self,
        job: str | Job,
        after_seq: int | None = None,
        *,
        reconnect_within_s: float = DEFAULT_RECONNECT_WITHIN_S,
    ) -> Iterator[Event]:
        return self._iterate(self._async.events(job, after_seq, reconnect_within_s=reconnect_within_s))

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(work)

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """The async iterator's items, each fetched on the client's loop."""

        async def next_item() -> tuple[bool, T | None]:
            try:
                return True, await anext(items)
            except StopAsyncIteration:
                return False, None

        def generate() -> Iterator[T]:
            try:
                while True:
                    more, item = self._run(next_item())
                    if not more:
                        return
                    yield item  # type: ignore[misc]  # an item is None only when there is none
            finally:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    self._run(aclose())

        return generate()
