"""Several progress processes on one port (CONVEYOR_PROGRESS_PROCESSES=2), on the real broker: the
kernel spreads connections over both, each delivers every event of a job, a killed one is replaced
while the other serves, stopping the service stops them all, and `/metrics` sums them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection

from services.progress.processes import metrics_dir_path

from harness import KEY_A, METRICS_TOKEN, Stack, alive, descendants, eventually, sleep_job

pytestmark = [
    pytest.mark.stack_settings(CONVEYOR_PROGRESS_PROCESSES="2"),
    pytest.mark.parametrize("database_kind", ["sqlite"], indirect=True),
]

CHILDREN = 2
# Sockets opened at most while waiting for the kernel to hand some to each process (it hashes each
# connection's addresses: 2 ** -20 that 20 land on one of two).
MAX_SOCKETS = 40
RESTART_S = 60.0
STOP_S = 30.0
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
# The services' default host, which the tests' stacks keep.
DEFAULT_HOST = "127.0.0.1"
RECEIVE_TIMEOUT_S = 60

Message = dict[str, Any]


def children(stack: Stack) -> set[int]:
    """The progress service's live child processes."""
    parent = stack.processes["progress"].pid
    return {pid for pid, cmd in descendants(parent).items() if "--parent-pid" in cmd and alive(pid)}


def tcp_inodes(local_port: int, remote_port: int, state: str) -> set[str]:
    """The sockets (as their fds read, `socket:[inode]`) of the TCP table with these ports and state."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                if (local, remote) == (local_port, remote_port) and fields[3] == state:
                    inodes.add(f"socket:[{fields[9]}]")
    return inodes


def holder(inodes: set[str], pids: set[int]) -> int | None:
    """Which of `pids` holds one of the sockets."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None


def serving_pid(ws: ClientConnection, server_port: int, pids: set[int]) -> int | None:
    """Which of `pids` holds the server's end of the WebSocket."""
    return holder(tcp_inodes(server_port, ws.local_address[1], TCP_ESTABLISHED), pids)


def listening(stack: Stack) -> set[int]:
    """The children that listen on the port (a child listens once it has started)."""
    inodes = tcp_inodes(port_of(stack), 0, TCP_LISTEN)
    return {pid for pid in children(stack) if holder(inodes, {pid}) is not None}


async def both_listening(stack: Stack) -> set[int]:
    """Both children, once both listen: /readyz answered by one says nothing of the other."""
    pids: set[int] = await eventually(
        lambda: len(now := listening(stack)) == CHILDREN and now, RESTART_S, "both children to listen"
    )
    return pids


async def scrape(stack: Stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of the service's /metrics, by name and labels, on a connection of its own."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{http_of(stack)}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def metric(stack: Stack, name: str, **labels: str) -> float:
    return (await scrape(stack)).get((name, frozenset(labels.items())), 0.0)


async def read_to_close(ws: ClientConnection) -> tuple[list[Message], int | None]:
    """Every message until the server closes; and its close code."""
    messages = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT_S)))
    return messages, ws.close_code


def assert_gap_free(events: list[Message], after_seq: int) -> None:
    """The events (a coalesced one standing for its range) are each seq after `after_seq`, in order."""
    seqs: list[int] = []
    for event in events:
        seqs.extend(range(event.get("coalesced_from", event["seq"]), event["seq"] + 1))
    assert seqs == list(range(after_seq + 1, after_seq + 1 + len(seqs))), f"not gap-free: {seqs}"


async def last_seq(stack: Stack, job_id: str) -> int:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as client:
        response = await client.get(f"{http_of(stack)}/v1/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    seq: int = response.json()["last_seq"]
    return seq


def port_of(stack: Stack) -> int:
    return int(stack.env["CONVEYOR_PROGRESS_PORT"])


def http_of(stack: Stack) -> str:
    return stack.progress_url.replace("ws://", "http://")


class Sockets:
    """WebSockets opened on the service, each with the pid of the process serving it."""

    def __init__(self, stack: Stack, exits: contextlib.AsyncExitStack) -> None:
        self.stack = stack
        self.exits = exits
        self.by_pid: dict[int, list[ClientConnection]] = {}

    async def open(self, path: str = "/v1/events") -> tuple[ClientConnection, int]:
        url = f"{self.stack.progress_url}{path}"
        ws = await self.exits.enter_async_context(
            websockets.connect(url, additional_headers={"Authorization": f"Bearer {KEY_A}"}, open_timeout=30)
        )
        pids = children(self.stack)
        pid = await eventually(lambda: serving_pid(ws, port_of(self.stack), pids), 10, "the serving pid")
        self.by_pid.setdefault(pid, []).append(ws)
        return ws, pid

    async def on_each(self, pids: set[int], at_least: int, path: str = "/v1/events") -> None:
        """Open sockets until each of `pids` serves `at_least` of them."""
        for _ in range(MAX_SOCKETS):
            if all(len(self.by_pid.get(pid, [])) >= at_least for pid in pids):
                return
            await self.open(path)
        raise AssertionError(f"{MAX_SOCKETS} sockets did not reach each of {pids}: {self.counts()}")

    def counts(self) -> dict[int, int]:
        return {pid: len(sockets) for pid, sockets in self.by_pid.items()}

    def all(self) -> list[ClientConnection]:
        return [ws for sockets in self.by_pid.values() for ws in sockets]


@contextlib.asynccontextmanager
async def sockets_of(stack: Stack) -> AsyncIterator[Sockets]:
    async with contextlib.AsyncExitStack() as exits:
        yield Sockets(stack, exits)


async def sum_of_connections(stack: Stack, expected: int) -> bool:
    return await metric(stack, "conveyor_websocket_connections") == expected


async def test_two_processes_share_the_port_and_metrics_sum_over_them(stack: Stack) -> None:
    pids = await both_listening(stack)
    async with sockets_of(stack) as sockets:
        await sockets.on_each(pids, at_least=3)
        assert set(sockets.counts()) == pids
        opened = len(sockets.all())
        # Each scrape, on a connection of its own, reaches either process: every one sees both's sockets.
        for _ in range(10):
            assert await metric(stack, "conveyor_websocket_connections") == opened
        # Counters sum too: the scrapes answered so far, whichever process answered each.
        await eventually(
            lambda: _metrics_requests_at_least(stack, 10), 10, "the scrapes to be counted by the service"
        )
    await eventually(lambda: sum_of_connections(stack, 0), 30, "the closed sockets to be counted out")


async def _metrics_requests_at_least(stack: Stack, count: int) -> bool:
    return await metric(stack, "conveyor_http_requests_total", route="/metrics", status="200") >= count


async def test_a_subscriber_on_either_process_gets_every_event_of_a_job(stack: Stack) -> None:
    pids = await both_listening(stack)
    # Delayed, so that every subscriber is there before it runs.
    job_id = await stack.submit_job({**sleep_job(seconds=3, steps=30), "delay_s": 3})
    async with sockets_of(stack) as sockets:
        await sockets.on_each(pids, at_least=2, path=f"/v1/jobs/{job_id}/events")
        results = await asyncio.gather(*(read_to_close(ws) for ws in sockets.all()))
        final_seq = await last_seq(stack, job_id)
        delivered: dict[int, set[int]] = {}
        for pid, socket_list in sockets.by_pid.items():
            for ws in socket_list:
                messages, code = results[sockets.all().index(ws)]
                assert code == 1000
                snapshot, events = messages[0], messages[1:]
                assert snapshot["type"] == "snapshot"
                assert_gap_free(events, after_seq=snapshot["seq"])
                assert events[-1]["type"] == "state" and events[-1]["status"] == "succeeded"
                assert events[-1]["seq"] == final_seq
                delivered.setdefault(pid, set()).update(event["seq"] for event in events)
    # Both processes wrote the job's live events.
    assert set(delivered) == pids and all(len(seqs) > 10 for seqs in delivered.values())


async def test_a_killed_process_is_replaced_while_the_other_serves(stack: Stack) -> None:
    pids = await both_listening(stack)
    async with sockets_of(stack) as sockets:
        await sockets.on_each(pids, at_least=2)
        victim, survivor = sorted(pids)
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: not alive(victim), 10, "the killed process to be gone")
        for ws in sockets.by_pid[victim]:
            await eventually(lambda ws=ws: ws.close_code is not None, 30, "its sockets to drop")
        survivors = len(sockets.by_pid[survivor])
        # Its sockets are counted out, however many it had: the parent cleared its live gauge.
        await eventually(lambda: sum_of_connections(stack, survivors), 30, "the sum without the dead one")

        # Meanwhile the other takes every new connection and serves it, and the parent starts another.
        job_id = await stack.submit_job(sleep_job(seconds=2, steps=10))
        ws, _ = await sockets.open(f"/v1/jobs/{job_id}/events")
        messages, code = await read_to_close(ws)
        assert code == 1000 and messages[-1]["status"] == "succeeded"
        assert_gap_free(messages[1:], after_seq=messages[0]["seq"])

        replaced = await both_listening(stack)
        assert victim not in replaced
        (newcomer,) = replaced - {survivor}
        await sockets.on_each({newcomer}, at_least=1)
    assert "supervisor.exited" in stack.log("progress")


async def test_stopping_the_service_stops_every_process(stack: Stack) -> None:
    pids = await both_listening(stack)
    # A second service on the same port is refused, rather than sharing it with the first.
    second = stack.start("progress-again", "progress")
    assert second.wait(timeout=STOP_S) == 3
    assert "progress.port_taken" in stack.log("progress-again")
    stack.stop("progress-again")

    async with sockets_of(stack) as sockets:
        await sockets.on_each(pids, at_least=1)
        process = stack.processes["progress"]
        process.terminate()
        assert process.wait(timeout=STOP_S) == 0
        await eventually(lambda: not any(alive(pid) for pid in pids), 10, "every child to be gone")
        # Their clients were told the service is going away (1012), to resume elsewhere.
        for ws in sockets.all():
            await eventually(lambda ws=ws: ws.close_code is not None, 10, "the sockets to close")
        assert {ws.close_code for ws in sockets.all()} == {1012}

    # Even SIGKILLed, the parent leaves no child behind.
    stack.start("progress")
    await stack.wait_ready(http_of(stack))
    pids = await both_listening(stack)
    stack.kill("progress")
    await eventually(lambda: not any(alive(pid) for pid in pids), 10, "the orphans to be gone")
    # The one thing it leaves: its children's metrics folder, emptied by the next start on the address.
    left = metrics_dir_path(stack.env.get("CONVEYOR_HOST", DEFAULT_HOST), port_of(stack))
    assert left.is_dir()
    shutil.rmtree(left)
