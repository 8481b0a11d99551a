"""One job's event stream over a WebSocket: a snapshot, each newer event, the terminal event, close 1000."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

from conveyor.auth import Principal
from conveyor.database import Database
from conveyor.events import JobEvent
from conveyor.jobstore import get_job
from conveyor.lifecycle import JobState
from conveyor.schemas import job_resource
from services.progress.hub import EventHub, Subscription

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008
# Application close codes (4000-4999): the job is unknown to this tenant; the client fell behind.
CLOSE_UNKNOWN_JOB = 4404
CLOSE_FELL_BEHIND = 4008


async def stream_job_events(
    websocket: WebSocket, *, db: Database, hub: EventHub, principal: Principal, job_id: str, events_url: str
) -> None:
    # Subscribe before reading the snapshot: an event committed after the snapshot was read is then
    # certain to reach the subscription, and older ones are dropped by their `seq`.
    subscription = hub.subscribe(job_id)
    try:
        async with db.reading() as session:
            job = await get_job(session, principal.tenant, job_id)
        if job is None:
            await websocket.send_json({"type": "error", "error": "unknown_job", "job_id": job_id})
            await websocket.close(CLOSE_UNKNOWN_JOB, "unknown job")
            return
        resource = job_resource(job, events_url)
        await websocket.send_json(
            {"type": "snapshot", "seq": job.last_seq, "job": resource.model_dump(mode="json")}
        )
        if JobState(job.status).is_terminal:
            await websocket.close(CLOSE_NORMAL)
            return
        await _forward_until_terminal(websocket, subscription, after_seq=job.last_seq)
    finally:
        hub.unsubscribe(subscription)


async def _forward_until_terminal(websocket: WebSocket, subscription: Subscription, after_seq: int) -> None:
    sender = asyncio.create_task(_send_events(websocket, subscription, after_seq))
    receiver = asyncio.create_task(_read_until_disconnect(websocket))
    done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if sender in done and sender.exception() is None:
        code, reason = sender.result()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code, reason)


async def _send_events(websocket: WebSocket, subscription: Subscription, after_seq: int) -> tuple[int, str]:
    last_seq = after_seq
    while True:
        event: JobEvent = await subscription.queue.get()
        if subscription.overflowed.is_set():
            return CLOSE_FELL_BEHIND, f"fell behind; resume after seq {last_seq}"
        if event.seq <= last_seq:
            continue  # already in the snapshot, or a repeat of a republished event
        await websocket.send_text(event.model_dump_json())
        last_seq = event.seq
        if event.is_terminal:
            return CLOSE_NORMAL, ""


async def _read_until_disconnect(websocket: WebSocket) -> None:
    """The client sends nothing on this endpoint; reading only notices that it went away."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
