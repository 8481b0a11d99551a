"""What one client may cost the progress service, on the real broker and both databases: the largest
frame, the time to authenticate, messages per second, sockets and SSE streams per tenant, and
subscriptions per socket (ids that are not the tenant's jobs count too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from conveyor.settings import DEFAULT_PROGRESS_WS_MAX_BYTES
from services.progress.protocol import MAX_IDS_PER_MESSAGE
from services.progress.streams import MAX_SUBSCRIPTIONS

from harness import KEY_A, KEY_B, Stack, assert_problem, eventually, sleep_job

RECEIVE_TIMEOUT_S = 30
# The limited instance's settings: small enough to reach in a test.
AUTH_TIMEOUT_S = 1
MESSAGE_RATE = 1
MESSAGE_BURST = 5
TENANT_MAX_SOCKETS = 2
TENANT_MAX_STREAMS = 1

Message = dict[str, Any]


@pytest.fixture(scope="module")
async def limited(module_stack: Stack) -> AsyncIterator[str]:
    """A progress instance of the module's stack with small limits; its ws:// URL."""
    url = await module_stack.start_progress(
        "progress-limited",
        CONVEYOR_PROGRESS_AUTH_TIMEOUT_S=str(AUTH_TIMEOUT_S),
        CONVEYOR_PROGRESS_MESSAGE_RATE=str(MESSAGE_RATE),
        CONVEYOR_PROGRESS_MESSAGE_BURST=str(MESSAGE_BURST),
        CONVEYOR_PROGRESS_TENANT_MAX_SOCKETS=str(TENANT_MAX_SOCKETS),
        CONVEYOR_PROGRESS_TENANT_MAX_STREAMS=str(TENANT_MAX_STREAMS),
    )
    yield url
    module_stack.stop("progress-limited")


@contextlib.asynccontextmanager
async def connect(url: str, key: str | None = KEY_A) -> AsyncIterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with websockets.connect(url, additional_headers=headers, open_timeout=30) as ws:
        yield ws


async def receive(ws: ClientConnection) -> Message:
    message: Message = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_S))
    return message


async def read_to_close(ws: ClientConnection) -> list[Message]:
    """Every message until the server closes (its code is then `ws.close_code`)."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            messages.append(await receive(ws))
    return messages


def http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://")


async def test_a_frame_over_the_limit_closes_the_socket_before_or_after_authentication(
    module_stack: Stack,
) -> None:
    url = f"{module_stack.progress_url}/v1/events"
    too_large = json.dumps({"op": "auth", "token": "k" * DEFAULT_PROGRESS_WS_MAX_BYTES})
    for key in (None, KEY_A):  # the first message of an unauthenticated socket; then a later one
        async with connect(url, key=key) as ws:
            await ws.send(too_large)
            messages = await read_to_close(ws)
        assert (messages, ws.close_code) == ([], 1009), key
    # Just under the limit, a frame is read (and, being no valid message, answered as one).
    async with connect(url) as ws:
        await ws.send(json.dumps({"op": "ping", "padding": "p" * (DEFAULT_PROGRESS_WS_MAX_BYTES - 100)}))
        assert (await receive(ws))["error"] == "bad_message"


async def test_a_socket_that_sends_no_key_in_time_is_closed_with_1008(
    module_stack: Stack, limited: str
) -> None:
    job_id = await module_stack.submit_job({"type": "demo.noop"})
    for path in ("/v1/events", f"/v1/jobs/{job_id}/events"):
        started = time.monotonic()
        async with connect(f"{limited}{path}", key=None) as ws:
            messages = await read_to_close(ws)
        assert (ws.close_code, ws.close_reason) == (1008, "auth_timeout"), path
        assert [message["error"] for message in messages] == ["auth_timeout"]
        assert time.monotonic() - started < 10 * AUTH_TIMEOUT_S

    # In time, the key as a first message works on either socket: no key needs to be in a URL.
    async with connect(f"{limited}/v1/events", key=None) as ws:
        await ws.send(json.dumps({"op": "auth", "token": KEY_A}))
        await ws.send(json.dumps({"op": "ping"}))
        assert await receive(ws) == {"type": "pong"}
    async with connect(f"{limited}/v1/jobs/{job_id}/events", key=None) as ws:
        await ws.send(json.dumps({"op": "auth", "token": KEY_A}))
        assert (await receive(ws))["type"] == "snapshot"


async def test_a_socket_over_its_message_rate_is_closed_with_1008(limited: str) -> None:
    async with connect(f"{limited}/v1/events") as ws:
        for _ in range(MESSAGE_BURST):  # a burst is answered
            await ws.send(json.dumps({"op": "ping"}))
        assert [await receive(ws) for _ in range(MESSAGE_BURST)] == [{"type": "pong"}] * MESSAGE_BURST
        for _ in range(MESSAGE_BURST):  # more at once, with the bucket empty, is not
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"op": "ping"}))
        messages = await read_to_close(ws)
    assert ws.close_code == 1008 and ws.close_reason == "too_many_messages"
    assert len(messages) < MESSAGE_BURST


async def test_a_tenant_holds_at_most_its_sockets_on_an_instance(limited: str) -> None:
    url = f"{limited}/v1/events"
    async with contextlib.AsyncExitStack() as held:
        sockets = [await held.enter_async_context(connect(url)) for _ in range(TENANT_MAX_SOCKETS)]
        for ws in sockets:
            await ws.send(json.dumps({"op": "ping"}))
            assert await receive(ws) == {"type": "pong"}
        async with connect(url) as refused:
            messages = await read_to_close(refused)
        assert refused.close_code == 4429 and refused.close_reason == "too_many_sockets"
        assert [message["error"] for message in messages] == ["too_many_sockets"]
        async with connect(url, key=KEY_B) as other_tenant:  # the cap is each tenant's own
            await other_tenant.send(json.dumps({"op": "ping"}))
            assert await receive(other_tenant) == {"type": "pong"}
        await sockets[0].close()

    # Closed sockets give their places back.
    async def admitted() -> bool:
        # A refused socket may be closed before the ping is even sent, so the send is
        # guarded as well as the receive.
        async with connect(url) as ws:
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"op": "ping"}))
                return await receive(ws) == {"type": "pong"}
            return False

    await eventually(admitted, RECEIVE_TIMEOUT_S, "a socket to be admitted again")


async def test_a_tenant_holds_at_most_its_sse_streams_on_an_instance(
    module_stack: Stack, limited: str
) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=30, steps=30))
    url = f"{http_url(limited)}/v1/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {KEY_A}", "Accept": "text/event-stream"}
    async with httpx.AsyncClient(headers=headers, timeout=RECEIVE_TIMEOUT_S) as client:
        async with client.stream("GET", url) as first:
            assert first.status_code == 200
            refused = await client.get(url)
            body = assert_problem(refused, 429)
            assert body["limit"] == "streams" and refused.headers["Retry-After"]
            json_history = await client.get(url, headers={"Accept": "application/json"})
            assert json_history.status_code == 200  # the cap is on streams, not on history pages

        # The stream closed gives its place back.
        async def admitted() -> bool:
            async with client.stream("GET", url) as again:
                return again.status_code == 200

        await eventually(admitted, RECEIVE_TIMEOUT_S, "a stream to be admitted again")


async def test_every_id_subscribed_counts_toward_a_sockets_subscriptions(module_stack: Stack) -> None:
    mine = await module_stack.submit_job({"type": "demo.noop"})
    async with connect(f"{module_stack.progress_url}/v1/events") as ws:
        too_many_ids = [str(uuid.uuid4()) for _ in range(MAX_IDS_PER_MESSAGE + 1)]
        await ws.send(json.dumps({"op": "subscribe", "job_ids": too_many_ids}))
        error = await receive(ws)
        assert error["error"] == "bad_message" and error["errors"][0]["field"] == "subscribe.job_ids"

        # Ids that are no job of the tenant's fill the socket's subscriptions as jobs would.
        unknown = [str(uuid.uuid4()) for _ in range(MAX_SUBSCRIPTIONS)]
        for start in range(0, MAX_SUBSCRIPTIONS, MAX_IDS_PER_MESSAGE):
            batch = unknown[start : start + MAX_IDS_PER_MESSAGE]
            await ws.send(json.dumps({"op": "subscribe", "job_ids": batch}))
        answers = [await receive(ws) for _ in range(MAX_SUBSCRIPTIONS)]
        assert {answer["error"] for answer in answers} == {"unknown_job"}
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [mine, str(uuid.uuid4()), unknown[0]]}))
        refused = [await receive(ws) for _ in range(3)]
        assert [(answer["error"], answer["job_id"]) for answer in refused] == [
            ("too_many_subscriptions", mine),
            ("too_many_subscriptions", refused[1]["job_id"]),
            ("unknown_job", unknown[0]),  # known to be unknown: answered again, from memory
        ]
