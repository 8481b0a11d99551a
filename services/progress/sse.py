"""The same event stream over HTTP, for clients that cannot use WebSockets.

`GET /v1/jobs/{job_id}/events` with `Accept: text/event-stream` streams Server-Sent Events: each
message has the event's `seq` as its id, so a reconnecting `EventSource` resumes by itself with
`Last-Event-ID`. Once the job is finished and everything was sent, a reconnect gets 204, which tells
an `EventSource` to stop. Without that Accept header the endpoint answers the job's recorded events
as JSON (`?after_seq=N&limit=M`), for clients that catch up by polling.

A tenant holds at most `CONVEYOR_PROGRESS_TENANT_MAX_STREAMS` streams on one instance; one more is
answered 429.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from conveyor.auth import Forbidden, Principal, Unauthenticated, resolve_principal
from conveyor.eventlog import events_between
from conveyor.jobstore import get_job
from conveyor.pages import encoded_within, page_response
from conveyor.problems import (
    Problem,
    forbidden,
    invalid_field,
    job_not_found,
    too_many_requests,
    unauthorized,
)
from services.progress.channel import Channel, Subscribe
from services.progress.protocol import parse_seq
from services.progress.state import ProgressState, presented_token
from services.progress.streams import FELL_BEHIND, EventStream, Outgoing

# A comment line this often keeps proxies from closing a quiet stream.
SSE_PING_S = 15
# How many events one JSON page holds at most.
MAX_PAGE = 1000
# What the sender may have handed over that the response has not written yet.
SSE_BUFFER = 16
# What a tenant with all its streams open is told to wait: a stream ends when its job does.
STREAMS_FULL_RETRY_AFTER_S = 5


async def job_events(
    request: Request, job_id: str, after_seq: int | None = None, limit: int = MAX_PAGE
) -> Response:
    # `after_seq` (at least 0) and `limit` (1 to MAX_PAGE) were checked by the route's Query bounds.
    state: ProgressState = request.app.state.progress
    principal = await _principal(request, state)
    streaming = "text/event-stream" in request.headers.get("accept", "")
    last_event_id = request.headers.get("last-event-id")
    if streaming and after_seq is None and last_event_id:
        after_seq = parse_seq(last_event_id)
        if after_seq is None:
            raise invalid_field("Last-Event-ID", "Last-Event-ID must be the seq of an event")
    job = await state.db.read(functools.partial(get_job, tenant=principal.tenant, job_id=job_id))
    if job is None:
        raise job_not_found("no such job")
    if after_seq is not None and after_seq > job.last_seq:
        raise invalid_field("after_seq", f"after_seq is past the job's last seq, {job.last_seq}")
    finished = job.status.is_terminal and after_seq == job.last_seq
    if not streaming:
        upto = min(job.last_seq, (after_seq or 0) + limit)
        events = await state.db.read(
            functools.partial(
                events_between,
                job_id=job_id,
                after_seq=after_seq or 0,
                upto_seq=upto,
                tenant=principal.tenant,
            )
        )
        if events is None:
            raise Problem(410, "Gone", "this part of the job's history was pruned", slug="history-pruned")
        # Fewer events than asked for when they would pass CONVEYOR_MAX_PAGE_BYTES: the client goes on
        # after the last one it got, as after any page that ends before `last_seq`.
        documents = (event.model_dump(mode="json") for event in events)
        encoded = encoded_within(documents, state.settings.max_page_bytes)
        return page_response({"job_id": job_id, "last_seq": job.last_seq}, "events", encoded)
    if finished:
        return Response(status_code=204)
    tenant = principal.tenant
    if not state.streams.take(tenant):
        detail = f"at most {state.streams.limit} event streams per tenant on this instance"
        raise too_many_requests(detail, STREAMS_FULL_RETRY_AFTER_S, "streams")
    return HeldEventSource(
        _stream(state, principal, job_id, after_seq), release=lambda: state.streams.give_back(tenant)
    )


class HeldEventSource(EventSourceResponse):
    """An SSE response that holds one of its tenant's stream slots until it is over, however it ends
    (the job done, the client gone, the server stopping), even if its stream never started."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], release: Callable[[], None]) -> None:
        super().__init__(content, ping=SSE_PING_S)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _stream(
    state: ProgressState, principal: Principal, job_id: str, after_seq: int | None
) -> AsyncIterator[ServerSentEvent]:
    outgoing: asyncio.Queue[Outgoing] = asyncio.Queue(SSE_BUFFER)
    channel = Channel(state.settings.progress_client_queue, principal.tenant)
    stream = EventStream(state, principal, channel, outgoing.put, single_job=True)
    channel.request(Subscribe((job_id,), {job_id: after_seq} if after_seq is not None else {}))
    sender = asyncio.create_task(stream.run())
    try:
        while True:
            getter = asyncio.create_task(outgoing.get())
            await asyncio.wait({getter, sender}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _sse(getter.result())
                continue
            getter.cancel()
            end = sender.result()  # raise what stopped it
            while not outgoing.empty():
                yield _sse(outgoing.get_nowait())
            if end is FELL_BEHIND:
                # The client fell behind; its EventSource reconnects with the last id it got.
                yield ServerSentEvent(json.dumps({"error": "fell_behind"}), event="error")
            return
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


def _sse(message: Outgoing) -> ServerSentEvent:
    seq = str(message.seq) if message.seq is not None else None
    return ServerSentEvent(message.text, event=message.type, id=seq)


async def _principal(request: Request, state: ProgressState) -> Principal:
    """The request's principal with the read scope; else a 401 or a 403 problem, as on the gateway."""
    try:
        return await resolve_principal(state.authenticator, presented_token(request), scope="read")
    except Unauthenticated:
        raise unauthorized("send a valid API key as `Authorization: Bearer <key>`") from None
    except Forbidden as exc:
        raise forbidden(exc.scope) from None
