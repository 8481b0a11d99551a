"""A worker that is alive but cut off from the database gives its leases up before they expire, so the
job's next attempt, on another worker, never runs beside the old one; and it leaves the consumer group,
so the jobs of its partitions go to workers that can claim them.

The cut-off worker reaches PostgreSQL through a TCP proxy that the test closes; every other service
connects directly, so only that worker loses the database.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from conveyor.database import Database

from harness import Stack, at, event_history, eventually, wait_for_status, worker_events

JOB_TIMEOUT_S = 60
CUT_OFF_WORKER = "worker-cut-off"


class CuttableProxy:
    """Forwards TCP connections to a target until `cut`, which closes them all and refuses new ones."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> int:
        """Listen (again, on the same port after a cut); the port."""
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _connect(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(
            self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


@pytest.mark.parametrize("database_kind", ["postgresql"], indirect=True)
async def test_a_worker_cut_off_from_the_database_stops_its_job_before_the_next_attempt_starts(
    stack: Stack, database_url: str
) -> None:
    url = make_url(database_url)
    assert url.host is not None and url.port is not None
    proxy = CuttableProxy(url.host, url.port)
    proxied_url = url.set(host="127.0.0.1", port=await proxy.start()).render_as_string(hide_password=False)
    # Only the cut-off worker runs jobs until the cut: the stack's own worker waits to be started.
    stack.stop("worker-1")
    stack.start(
        CUT_OFF_WORKER,
        "worker",
        CONVEYOR_DATABASE_URL=proxied_url,
        CONVEYOR_LOG_JSON="true",
        CONVEYOR_LOG_LEVEL="DEBUG",
    )
    db = Database(database_url)
    try:
        async with stack.client() as client:
            job_id = (
                await client.post("/v1/jobs", json={"type": "demo.stubborn", "payload": {"seconds": 8}})
            ).json()["id"]
            await wait_for_status(client, job_id, {"running"}, JOB_TIMEOUT_S)
            await proxy.cut()
            cut_at = datetime.now(UTC)
            # The reaper of a worker that still has the database requeues the job once its lease expires.
            stack.start("worker-2", "worker", CONVEYOR_LOG_JSON="true", CONVEYOR_LOG_LEVEL="DEBUG")
            final = await wait_for_status(client, job_id, {"succeeded", "failed"}, JOB_TIMEOUT_S + 30)
            # Its database back, the worker joins the group again and takes a share of the partitions.
            await proxy.start()
            await eventually(
                lambda: worker_events(stack, "worker.rejoined_group", worker=CUT_OFF_WORKER),
                JOB_TIMEOUT_S,
                "the worker to rejoin",
            )
            rejoined = await submit_until_run_by(stack, client, CUT_OFF_WORKER)
        events = await event_history(db, job_id)
    finally:
        await db.close()
        stack.stop(CUT_OFF_WORKER)

    assert (final["status"], final["attempts"]) == ("succeeded", 2)
    assert events is not None
    second_start = next(
        event.at for event in events if event.status.value == "running" and event.attempt == 2
    )
    (given_up,) = worker_events(stack, "lease.given_up", job_id, worker=CUT_OFF_WORKER)
    (abandoned,) = worker_events(stack, "job.abandoned", job_id, worker=CUT_OFF_WORKER)
    # The old attempt stopped after the cut and before the new one started: never both at once.
    assert cut_at < at(given_up["timestamp"]) <= at(abandoned["timestamp"]) < second_start.astimezone(UTC)
    assert worker_events(stack, "lease.expired", job_id, worker="worker-2")
    # Unable to claim jobs, the cut-off worker left the consumer group, so its partitions (maybe the one
    # the requeued job went to) moved to worker-2.
    (left,) = worker_events(stack, "worker.left_group", worker=CUT_OFF_WORKER)
    assert at(left["timestamp"]) > cut_at
    assert rejoined["status"] == "succeeded"


async def submit_until_run_by(stack: Stack, client: httpx.AsyncClient, worker: str) -> dict[str, Any]:
    """Submit jobs one at a time until `worker` runs one (it owns some partitions again); that job."""
    pid = stack.processes[worker].pid

    async def one_run_by_worker() -> dict[str, Any] | None:
        job_id = (await client.post("/v1/jobs", json={"type": "demo.echo"})).json()["id"]
        final = await wait_for_status(client, job_id, {"succeeded", "failed"}, JOB_TIMEOUT_S)
        ran_here = any(
            record["job_id"] == job_id for record in worker_events(stack, "job.started", worker=worker)
        )
        return final if ran_here else None

    job: dict[str, Any] = await eventually(one_run_by_worker, JOB_TIMEOUT_S, f"a job run by {worker} ({pid})")
    return job
