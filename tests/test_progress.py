"""The progress service on the real broker and both databases: ordered, gap-free events over WebSockets
and Server-Sent Events, resumes after a disconnect and across a restart, several instances, tenant
isolation, a slow client beside a fast one, heartbeats and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from conveyor import changes
from conveyor.database import Database

from harness import KEY_A, KEY_B, TENANT_B, Stack, eventually, sleep_job, wait_for_status, write_now

JOB_TIMEOUT_S = 90
RECEIVE_TIMEOUT_S = 60

Message = dict[str, Any]


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def connect(url: str, key: str | None = KEY_A, **options: Any) -> AsyncIterator[ClientConnection]:
    headers = auth(key) if key else None
    async with websockets.connect(url, additional_headers=headers, open_timeout=30, **options) as ws:
        yield ws


async def receive(ws: ClientConnection) -> Message:
    message: Message = json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_S))
    return message


async def read_to_close(ws: ClientConnection) -> tuple[list[Message], int | None]:
    """Every message until the server closes; and its close code."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            messages.append(await receive(ws))
    return messages, ws.close_code


async def history(stack: Stack, job_id: str, after_seq: int = 0, key: str = KEY_A) -> dict[str, Any]:
    url = f"{http_url(stack.progress_url)}/v1/jobs/{job_id}/events"
    async with httpx.AsyncClient(headers=auth(key), timeout=30) as client:
        response = await client.get(url, params={"after_seq": after_seq})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://")


def covered(events: list[Message]) -> list[int]:
    """The seqs a list of events stands for, expanding coalesced progress events."""
    seqs: list[int] = []
    for event in events:
        seqs.extend(range(event.get("coalesced_from", event["seq"]), event["seq"] + 1))
    return seqs


def assert_gap_free(events: list[Message], after_seq: int) -> None:
    seqs = covered(events)
    assert seqs == list(range(after_seq + 1, after_seq + 1 + len(seqs))), f"not gap-free: {seqs}"


async def test_hundreds_of_progress_events_arrive_in_order_without_gaps(module_stack: Stack) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=3, steps=300))
    async with connect(f"{module_stack.progress_url}/v1/jobs/{job_id}/events") as ws:
        messages, code = await read_to_close(ws)

    assert code == 1000
    snapshot, events = messages[0], messages[1:]
    assert snapshot["type"] == "snapshot" and snapshot["job_id"] == job_id
    assert_gap_free(events, after_seq=snapshot["seq"])
    assert events[-1]["type"] == "state" and events[-1]["status"] == "succeeded"
    assert events[-1]["result"] == {"slept_s": 3.0, "steps": 300}
    progress = [event for event in events if event["type"] == "progress"]
    assert len(progress) >= 100, f"only {len(progress)} progress events"
    percents = [event["progress"]["percent"] for event in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    # What went live is exactly what the job's history recorded (coalesced events stand for a range).
    recorded = {event["seq"]: event for event in (await history(module_stack, job_id))["events"]}
    assert recorded[events[-1]["seq"]] == events[-1]
    for event in events:
        assert {**event, "coalesced_from": None} == {**recorded[event["seq"]], "coalesced_from": None}


async def test_resume_after_a_disconnect_mid_job_gets_exactly_the_missed_events(module_stack: Stack) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=4, steps=100))
    url = f"{module_stack.progress_url}/v1/jobs/{job_id}/events"
    async with connect(url) as ws:
        snapshot = await receive(ws)
        first_part = []
        while len(first_part) < 10:
            first_part.append(await receive(ws))
    seen = first_part[-1]["seq"]

    # Away while the job goes on: at least 20 more events happen meanwhile.
    async def moved_on() -> bool:
        return bool((await history(module_stack, job_id))["last_seq"] >= seen + 20)

    await eventually(moved_on, JOB_TIMEOUT_S, "the job to move on")
    async with connect(f"{url}?after_seq={seen}") as ws:
        messages, code = await read_to_close(ws)

    assert code == 1000
    resumed, second_part = messages[0], messages[1:]
    assert resumed["type"] == "resumed" and resumed["after_seq"] == seen
    assert second_part[0]["seq"] == seen + 1
    assert_gap_free(first_part + second_part, after_seq=snapshot["seq"])
    assert second_part[-1]["status"] == "succeeded"


async def test_resume_of_a_finished_job_replays_its_history(module_stack: Stack) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=0.2, steps=5))
    async with module_stack.client() as client:
        await wait_for_status(client, job_id, {"succeeded"}, JOB_TIMEOUT_S)
    url = f"{module_stack.progress_url}/v1/jobs/{job_id}/events"

    async with connect(f"{url}?after_seq=0") as ws:
        messages, code = await read_to_close(ws)
    assert code == 1000
    assert messages[0]["type"] == "resumed"
    events = messages[1:]
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [events[0]["status"], events[1]["status"], events[-1]["status"]] == [
        "queued",
        "running",
        "succeeded",
    ]

    last = events[-1]["seq"]
    async with connect(f"{url}?after_seq={last}") as ws:
        messages, code = await read_to_close(ws)
    assert (messages, code) == ([{**messages[0], "type": "resumed"}], 1000)

    async with connect(f"{url}?after_seq={last + 1}") as ws:
        messages, code = await read_to_close(ws)
    assert code == 4400 and messages[0]["error"] == "invalid_after_seq"


async def test_a_restart_of_the_progress_service_loses_nothing_a_client_cannot_resume(
    module_stack: Stack,
) -> None:
    instance = await module_stack.start_progress("progress-restarted")
    port = int(instance.rsplit(":", 1)[1])
    job_id = await module_stack.submit_job(sleep_job(seconds=6, steps=60))
    async with connect(f"{instance}/v1/jobs/{job_id}/events") as ws:
        snapshot = await receive(ws)
        first_part = [await receive(ws) for _ in range(5)]
        module_stack.kill("progress-restarted")  # SIGKILL: no goodbye to anyone
        _, code = await read_to_close(ws)
    assert code != 1000

    instance = await module_stack.start_progress("progress-restarted", port=port)
    try:
        async with connect(f"{instance}/v1/jobs/{job_id}/events?after_seq={first_part[-1]['seq']}") as ws:
            messages, code = await read_to_close(ws)
    finally:
        module_stack.stop("progress-restarted")
    assert code == 1000
    assert_gap_free(first_part + messages[1:], after_seq=snapshot["seq"])
    assert messages[-1]["status"] == "succeeded"


async def test_two_instances_each_deliver_every_event_to_their_own_clients(module_stack: Stack) -> None:
    second = await module_stack.start_progress("progress-second")
    try:
        job_id = await module_stack.submit_job(sleep_job(seconds=2, steps=40))
        path = f"/v1/jobs/{job_id}/events?after_seq=0"
        async with connect(module_stack.progress_url + path) as one, connect(second + path) as two:
            (from_one, code_one), (from_two, code_two) = await asyncio.gather(
                read_to_close(one), read_to_close(two)
            )
    finally:
        module_stack.stop("progress-second")
    assert code_one == code_two == 1000
    for messages in (from_one, from_two):
        assert_gap_free(messages[1:], after_seq=0)
        assert messages[-1]["status"] == "succeeded"
    assert covered(from_one[1:]) == covered(from_two[1:])
    assert from_one[-1] == from_two[-1]  # the same terminal event, result and all


async def test_a_tenant_never_sees_another_tenants_job(module_stack: Stack) -> None:
    url = module_stack.progress_url
    async with connect(f"{url}/v1/events", key=KEY_B) as watcher_b:
        await watcher_b.send(json.dumps({"op": "subscribe", "all": True}))
        assert (await receive(watcher_b))["type"] == "snapshot"
        job_a = await module_stack.submit_job(sleep_job(seconds=0.5, steps=3))
        job_b = await module_stack.submit_job({"type": "demo.noop"}, key=KEY_B)

        # Tenant B asks for A's job by id, on each endpoint: it does not exist for B.
        async with connect(f"{url}/v1/jobs/{job_a}/events", key=KEY_B) as ws:
            messages, code = await read_to_close(ws)
        assert code == 4404 and messages == [
            {"type": "error", "error": "unknown_job", "detail": "no such job", "job_id": job_a}
        ]
        await watcher_b.send(json.dumps({"op": "subscribe", "job_ids": [job_a]}))
        seen_b: list[Message] = []
        while (message := await receive(watcher_b))["type"] != "error":
            seen_b.append(message)  # B's own job, meanwhile
        assert message["error"] == "unknown_job" and message["job_id"] == job_a
        async with httpx.AsyncClient(headers=auth(KEY_B), timeout=30) as client:
            for accept in ("application/json", "text/event-stream"):
                response = await client.get(
                    f"{http_url(url)}/v1/jobs/{job_a}/events", headers={"Accept": accept}
                )
                assert response.status_code == 404
                assert response.headers["content-type"] == "application/problem+json"
                # The same problem as the gateway's for a job the tenant does not have.
                assert response.json()["type"] == "urn:conveyor:problem:job-not-found"

        # B's `all` subscription carries B's job to its end, and nothing of A's.
        while not (seen_b and seen_b[-1].get("status") == "succeeded"):
            message = await receive(watcher_b)
            assert message.get("job_id") != job_a
            assert message["tenant"] == "tenant-b"
            seen_b.append(message)
        assert {m["job_id"] for m in seen_b} == {job_b}
        assert_gap_free(seen_b, after_seq=0)
    async with module_stack.client() as client:
        await wait_for_status(client, job_a, {"succeeded"}, JOB_TIMEOUT_S)


# In the leak test below: subscribes each socket sends at once, sockets asking side by side, and a
# message rate and burst no socket reaches.
SUBSCRIBES_PER_SOCKET = 200
EVENTS_SOCKETS = 2
UNTHROTTLED = 1_000_000


async def test_subscribing_again_and_again_to_another_tenants_running_job_never_gets_its_events(
    module_stack: Stack,
) -> None:
    """Tenant B knows the id of A's job and asks for it in a loop, on every endpoint, while the job
    reports progress: each ask is refused, and not one of its events reaches B meanwhile."""
    # An instance that lets a socket send as fast as it likes: each subscribe is a window to try.
    url = await module_stack.start_progress(
        "progress-unthrottled",
        CONVEYOR_PROGRESS_MESSAGE_RATE=str(UNTHROTTLED),
        CONVEYOR_PROGRESS_MESSAGE_BURST=str(UNTHROTTLED),
    )
    job_a = await module_stack.submit_job(sleep_job(seconds=4, steps=400))
    foreign: list[Message] = []
    asks = {"events": 0, "job_socket": 0, "sse": 0}
    running = True

    def keep(message: Message) -> None:
        """Note a message that is A's: anything about A's job but its refusal, or of A's tenant."""
        about_a = message.get("job_id") == job_a and message["type"] != "error"
        if about_a or message.get("tenant", TENANT_B) != TENANT_B:
            foreign.append(message)

    async def on_events_socket() -> None:
        # With `all`, a job first seen live is sent from its seq 1, its history filling the hole: so
        # one event of A's let through would have brought A's whole history with it.
        while running:
            async with connect(f"{url}/v1/events", key=KEY_B) as ws:
                await ws.send(json.dumps({"op": "subscribe", "all": True}))
                for _ in range(SUBSCRIBES_PER_SOCKET):
                    await ws.send(json.dumps({"op": "subscribe", "job_ids": [job_a]}))
                refused = 0
                while refused < SUBSCRIBES_PER_SOCKET:
                    message = await receive(ws)
                    if message["type"] == "error":
                        assert (message["error"], message["job_id"]) == ("unknown_job", job_a)
                        refused += 1
                    keep(message)
                asks["events"] += refused
                # Asked once every refusal is in, the pong comes after whatever was queued meanwhile.
                await ws.send(json.dumps({"op": "ping"}))
                while (message := await receive(ws))["type"] != "pong":
                    keep(message)

    async def on_job_socket() -> None:
        while running:
            async with connect(f"{url}/v1/jobs/{job_a}/events?after_seq=0", key=KEY_B) as ws:
                messages, code = await read_to_close(ws)
            assert code == 4404 and [m["error"] for m in messages] == ["unknown_job"]
            asks["job_socket"] += 1

    async def on_sse() -> None:
        headers = {**auth(KEY_B), "Accept": "text/event-stream"}
        async with httpx.AsyncClient(timeout=30) as client:
            while running:
                for resume in ({}, {"Last-Event-ID": "0"}):
                    response = await client.get(
                        f"{http_url(url)}/v1/jobs/{job_a}/events", headers={**headers, **resume}
                    )
                    assert response.status_code == 404
                    asks["sse"] += 1

    asking = (on_job_socket, on_sse, *[on_events_socket] * EVENTS_SOCKETS)
    askers = [asyncio.create_task(ask()) for ask in asking]
    try:
        async with module_stack.client() as client:
            await wait_for_status(client, job_a, {"succeeded"}, JOB_TIMEOUT_S)
    finally:
        running = False
        await asyncio.gather(*askers)
        module_stack.stop("progress-unthrottled")
    assert foreign == []
    assert min(asks.values()) > 0, asks


async def test_one_socket_for_many_jobs(module_stack: Stack) -> None:
    done = await module_stack.submit_job({"type": "demo.echo", "payload": {"n": 1}})
    async with module_stack.client() as client:
        await wait_for_status(client, done, {"succeeded"}, JOB_TIMEOUT_S)
    slow = await module_stack.submit_job(sleep_job(seconds=30, steps=300))
    fast = await module_stack.submit_job(sleep_job(seconds=1, steps=5))

    async with connect(f"{module_stack.progress_url}/v1/events") as ws:
        await ws.send(json.dumps({"op": "subscribe", "job_ids": [fast, slow, done], "after_seq": {done: 1}}))
        by_job: dict[str, list[Message]] = {fast: [], slow: [], done: []}
        while not by_job[fast] or by_job[fast][-1].get("status") != "succeeded":
            message = await receive(ws)
            by_job[message["job_id"]].append(message)
        await ws.send(json.dumps({"op": "unsubscribe", "job_ids": [slow]}))
        while (message := await receive(ws))["type"] != "unsubscribed":
            assert message["job_id"] == slow
            by_job[slow].append(message)
        assert message == {"type": "unsubscribed", "job_ids": [slow]}
        await ws.send(json.dumps({"op": "ping"}))
        assert await receive(ws) == {"type": "pong"}  # nothing more of `slow` after its unsubscribe

        # `all`: a snapshot of the unfinished jobs, then every job of the tenant, new ones from seq 1.
        await ws.send(json.dumps({"op": "subscribe", "all": True}))
        snapshot = await receive(ws)
        assert snapshot["type"] == "snapshot" and snapshot["all"] is True
        assert slow in {job["job_id"] for job in snapshot["jobs"]}
        newcomer = await module_stack.submit_job({"type": "demo.echo", "payload": {"n": 2}})
        mine: list[Message] = []
        while not mine or mine[-1].get("status") != "succeeded":
            message = await receive(ws)
            if message.get("job_id") == newcomer:
                mine.append(message)
        assert_gap_free(mine, after_seq=0)
        assert mine[-1]["result"] == {"n": 2}

    # Each subscription got its snapshot (or its replay) and then its events, in order.
    assert [m["type"] for m in by_job[done]] == ["resumed", "state", "state"]
    assert [m["seq"] for m in by_job[done][1:]] == [2, 3]
    for job_id in (fast, slow):
        snapshot, events = by_job[job_id][0], by_job[job_id][1:]
        assert snapshot["type"] == "snapshot"
        assert_gap_free(events, after_seq=snapshot["seq"])


async def test_authentication_by_header_query_or_first_message(module_stack: Stack) -> None:
    job_id = await module_stack.submit_job({"type": "demo.noop"})
    async with module_stack.client() as client:
        await wait_for_status(client, job_id, {"succeeded"}, JOB_TIMEOUT_S)
    url = f"{module_stack.progress_url}/v1/jobs/{job_id}/events"

    async with connect(f"{url}?token={KEY_A}", key=None) as ws:
        messages, code = await read_to_close(ws)
    assert code == 1000 and messages[0]["type"] == "snapshot"

    async with connect(url, key=None) as ws:
        await ws.send(json.dumps({"op": "auth", "token": KEY_A}))
        messages, code = await read_to_close(ws)
    assert code == 1000 and messages[0]["type"] == "snapshot"

    for key, first in (("wrong-key", None), (None, {"op": "auth", "token": "wrong"}), (None, "not json")):
        async with connect(url, key=key) as ws:
            if first is not None:
                await ws.send(first if isinstance(first, str) else json.dumps(first))
            messages, code = await read_to_close(ws)
        assert code == 1008, (key, first)
        assert messages == [{"type": "error", "error": "unauthorized", "detail": messages[0]["detail"]}]


async def test_bad_messages_get_an_error_and_the_socket_keeps_serving(module_stack: Stack) -> None:
    async with connect(f"{module_stack.progress_url}/v1/events") as ws:
        for bad in (
            "not json",
            "[]",
            '{"op": "dance"}',
            '{"op": "subscribe"}',
            '{"op": "subscribe", "job_ids": [7]}',
        ):
            await ws.send(bad)
            error = await receive(ws)
            assert error["type"] == "error" and error["error"] == "bad_message", bad
        await ws.send(b"\x00binary")
        assert (await receive(ws))["error"] == "bad_message"
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["x" * 65]}))
        assert (await receive(ws))["errors"][0]["field"].startswith("subscribe.job_ids")
        await ws.send(json.dumps({"op": "subscribe", "job_ids": ["no-such-job"]}))
        assert (await receive(ws))["error"] == "unknown_job"
        await ws.send(json.dumps({"op": "ping"}))
        assert await receive(ws) == {"type": "pong"}
    bad_resume = f"{module_stack.progress_url}/v1/jobs/whatever/events?after_seq=-1"
    async with connect(bad_resume) as ws:
        messages, code = await read_to_close(ws)
    assert code == 4400 and messages[0]["error"] == "invalid_after_seq"


async def sse_events(response: httpx.Response) -> AsyncIterator[Message]:
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event"),
                    "data": json.loads(fields["data"]),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def test_server_sent_events_stream_and_resume_with_last_event_id(module_stack: Stack) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=3, steps=30))
    url = f"{http_url(module_stack.progress_url)}/v1/jobs/{job_id}/events"
    stream_headers = {**auth(), "Accept": "text/event-stream"}
    async with httpx.AsyncClient(timeout=RECEIVE_TIMEOUT_S) as client:
        first_part: list[Message] = []
        async with client.stream("GET", url, headers=stream_headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event in sse_events(response):
                first_part.append(event)
                if len(first_part) == 6:
                    break
        snapshot = first_part[0]
        assert snapshot["event"] == "snapshot" and snapshot["id"] == str(snapshot["data"]["seq"])
        last_id = first_part[-1]["id"]
        assert last_id is not None

        async with client.stream(
            "GET", url, headers={**stream_headers, "Last-Event-ID": last_id}
        ) as response:
            second_part = [event async for event in sse_events(response)]
        assert second_part[0]["event"] == "resumed"
        events = [event["data"] for event in first_part[1:] + second_part[1:]]
        assert [event["id"] for event in first_part[1:] + second_part[1:]] == [str(e["seq"]) for e in events]
        assert_gap_free(events, after_seq=snapshot["data"]["seq"])
        assert events[-1]["status"] == "succeeded"

        # Everything was sent: a reconnecting EventSource is told to stop.
        response = await client.get(url, headers={**stream_headers, "Last-Event-ID": str(events[-1]["seq"])})
        assert response.status_code == 204
        response = await client.get(url, headers={**stream_headers, "Last-Event-ID": "x"})
        assert response.status_code == 422 and response.json()["errors"][0]["field"] == "Last-Event-ID"
        response = await client.get(url, headers={"Accept": "text/event-stream"})
        assert response.status_code == 401

        # Without the SSE Accept header: the recorded events as JSON, paged with after_seq and limit.
        page = (await client.get(url, params={"after_seq": 2, "limit": 3}, headers=auth())).json()
        assert [event["seq"] for event in page["events"]] == [3, 4, 5]
        assert page["last_seq"] == events[-1]["seq"]


async def test_a_slow_client_does_not_delay_a_fast_one_and_is_told_to_resume(module_stack: Stack) -> None:
    # No protocol pings: the slow client would miss them, and this test is about its queue.
    instance = await module_stack.start_progress(
        "progress-small-queue", CONVEYOR_PROGRESS_CLIENT_QUEUE="200", CONVEYOR_PROGRESS_PING_INTERVAL_S="3600"
    )
    url = f"{instance}/v1/events"
    jobs = 150
    # The slow client reads nothing: its kernel buffer is tiny and its library stops reading when full.
    # (set before connecting, so the TCP window it offers is small from the start).
    slow_socket = socket.socket()
    slow_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_socket.connect(("127.0.0.1", int(instance.rsplit(":", 1)[1])))
    try:
        async with (
            connect(url, sock=slow_socket, max_queue=1, ping_interval=None, compression=None) as slow,
            connect(url) as fast,
        ):
            for ws in (slow, fast):
                await ws.send(json.dumps({"op": "subscribe", "all": True}))
            assert (await receive(fast))["type"] == "snapshot"
            # Results of 80 kB each, incompressible: far more than the kernel's buffers (4 MB here) hold.
            payload = {"text": os.urandom(40_000).hex()}
            body = {"type": "demo.echo", "payload": payload}

            async def submit_all() -> list[str]:
                async with module_stack.client() as client:
                    return [(await client.post("/v1/jobs", json=body)).json()["id"] for _ in range(jobs)]

            submitting = asyncio.create_task(submit_all())
            by_job: dict[str, list[Message]] = {}
            succeeded: set[str] = set()
            async with asyncio.timeout(JOB_TIMEOUT_S):
                while not submitting.done() or not succeeded.issuperset(submitting.result()):
                    message = await receive(fast)  # the fast client reads while jobs are submitted and run
                    if message["type"] in ("state", "progress"):
                        by_job.setdefault(message["job_id"], []).append(message)
                        if message["status"] == "succeeded":
                            succeeded.add(message["job_id"])
            job_ids = submitting.result()
            for job_id in job_ids:
                assert_gap_free(by_job[job_id], after_seq=0)
                assert by_job[job_id][-1]["result"] == payload

            # Meanwhile the slow one fell hopelessly behind: once it reads, it finds a 4008 close.
            received, code = await read_to_close(slow)
            assert code == 4008, code
            assert "after_seq" in (slow.close_reason or "")
            assert len(received) < 3 * len(job_ids)
    finally:
        module_stack.stop("progress-small-queue")


async def test_idle_sockets_and_silent_peers_are_closed(module_stack: Stack) -> None:
    instance = await module_stack.start_progress(
        "progress-heartbeat",
        CONVEYOR_PROGRESS_IDLE_TIMEOUT_S="1",
        CONVEYOR_PROGRESS_PING_INTERVAL_S="0.5",
        CONVEYOR_PROGRESS_PING_TIMEOUT_S="0.5",
    )
    try:
        # No subscription and nothing said: closed as idle (1001).
        async with connect(f"{instance}/v1/events") as ws:
            messages, code = await read_to_close(ws)
        assert (messages, code, ws.close_reason) == ([], 1001, "idle")

        # A peer that never answers the server's pings is dropped even while its job runs.
        job_id = await module_stack.submit_job(sleep_job(seconds=20, steps=20))
        port = int(instance.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {KEY_A}\r\n\r\n"
            ).encode()
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 101")

        async def dropped() -> bool:
            try:
                return await asyncio.wait_for(reader.read(65536), timeout=0.2) == b""
            except TimeoutError:
                return False

        await eventually(dropped, 15, "the silent peer to be dropped")
        writer.close()
    finally:
        module_stack.stop("progress-heartbeat")


async def test_progress_reports_under_load_are_coalesced_at_the_source_not_lost(module_stack: Stack) -> None:
    """A handler that reports far faster than the database takes writes: the newest report wins."""
    job_id = await module_stack.submit_job(sleep_job(seconds=0, steps=1000))
    async with module_stack.client() as client:
        final = await wait_for_status(client, job_id, {"succeeded"}, JOB_TIMEOUT_S)
    assert final["progress"]["percent"] == 100.0
    recorded = (await history(module_stack, job_id))["events"]
    assert [event["seq"] for event in recorded] == list(range(1, len(recorded) + 1))
    progress = [event for event in recorded if event["type"] == "progress"]
    assert progress and progress[-1]["progress"]["message"] == "step 1000 of 1000"
    assert len(progress) < 1000  # written as fast as the database allowed, the rest coalesced


async def test_an_event_kafka_has_not_delivered_is_filled_from_the_history_and_its_late_copy_dropped(
    module_stack: Stack,
) -> None:
    job_id = await module_stack.submit_job(sleep_job(seconds=14, steps=70))
    async with connect(f"{module_stack.progress_url}/v1/jobs/{job_id}/events") as ws:
        snapshot = await receive(ws)
        first = [await receive(ws)]
        while first[-1]["type"] != "progress":
            first.append(await receive(ws))
        # A process commits an event, then dies before publishing it: it waits in the outbox for the
        # orphan sweep (10 s), while the worker's next events reach Kafka first.
        db = Database(module_stack.env["CONVEYOR_DATABASE_URL"])
        try:
            report = changes.progress(job_id, first[-1]["attempt"], 50.0, "from a dead process")
            written = await write_now(db, module_stack.env["CONVEYOR_TOPIC_PREFIX"], report)
            job = written.results[0][0].job
            assert job is not None
        finally:
            await db.close()
        rest, code = await read_to_close(ws)

    assert code == 1000
    events = first + rest
    assert_gap_free(events, after_seq=snapshot["seq"])
    orphan = [e for e in events if e["progress"]["message"] == "from a dead process"]
    assert len(orphan) == 1 and orphan[0]["seq"] == job.last_seq, "delivered once, in its place"
