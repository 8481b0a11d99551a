"""What one WebSocket costs the progress service, measured inside it: memory (RSS and, with
``--tracemalloc``, the Python allocations by line), CPU to connect, CPU per delivery, and what is
left once the sockets close. It prints figures and asserts nothing.

It starts an embedded stack with no workers (``python -m conveyor run``, as throughput.py does) and
submits one ``demo.sleep`` job, which stays queued. Then it runs a progress service of its own in this
process, on the stack's database and broker, under uvicorn with the service's WebSocket protocol, and
opens ``--subscribers`` sockets to that job's events from a client subprocess (each reads its
snapshot). Unlike progress_fanout.py, the service's own heap can be looked at:

- memory per connection: this process's RSS after connecting minus before, over N; with
  ``--tracemalloc``, the traced allocations that appeared, by line (tracing makes connecting ~20x slower);
- ``--deliver M``: M progress events handed to the service's hub as if read from Kafka; each is
  written to every socket; the CPU of those hand-overs over M x N, in user space and in the kernel
  (`os.times`, in ticks of 10 ms: hand over enough for many ticks);
- after every socket has closed (the service's connection gauge back to 0): RSS and traced memory
  against before, then ``--cycles`` more rounds of connect-all / close-all. RSS that stays level over
  the rounds is memory reused by the allocator; RSS (or traced memory) that grows each round is a leak.

    python bench/progress_memory.py [--subscribers 3000] [--tracemalloc] [--deliver 50] [--cycles 3]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import benchkit as kit
import httpx
import uvicorn
import uvloop

CONNECT_CONCURRENCY = 100
CLOSE_WAIT_S = 30.0
SETTLE_S = 2.0
TOP_LINES = 25


def rss_kib() -> int:
    for line in open("/proc/self/status"):  # noqa: SIM115 - read at once
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the client subprocess ------------------------------------------------------------------------------


async def hold_sockets(url: str, count: int) -> None:
    """Open `count` sockets, each reading its snapshot; say so; on a line from stdin, close them all."""
    from websockets.asyncio.client import connect

    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    sockets = []

    async def one() -> None:
        async with limit:
            websocket = await connect(url, compression=None, max_queue=None)
            await websocket.recv()
            sockets.append(websocket)

    await asyncio.gather(*(one() for _ in range(count)))
    print("connected", len(sockets), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(websocket.close() for websocket in sockets))
    print("closed", flush=True)


class Sockets:
    """A client subprocess holding N sockets."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def open(cls, url: str, count: int) -> Sockets:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            url,
            str(count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        sockets = cls(process)
        line = await sockets._line()
        if not line.startswith("connected"):
            raise RuntimeError(f"the client process said {line!r}")
        return sockets

    async def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(b"\n")
        await self._process.stdin.drain()
        await self._line()
        await self._process.wait()

    async def _line(self) -> str:
        assert self._process.stdout is not None
        return (await self._process.stdout.readline()).decode().strip()


# --- the measurement --------------------------------------------------------------------------------


async def all_closed() -> None:
    from conveyor.metrics import WEBSOCKET_CONNECTIONS

    deadline = time.monotonic() + CLOSE_WAIT_S
    while WEBSOCKET_CONNECTIONS._value.get() > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    await asyncio.sleep(SETTLE_S)
    gc.collect()


def print_allocations(after: tracemalloc.Snapshot, before: tracemalloc.Snapshot, per: int) -> None:
    stats = after.compare_to(before, "lineno")
    print(f"traced: {sum(s.size_diff for s in stats) / per / 1024:.1f} KiB per connection; by line:")
    for stat in stats[:TOP_LINES]:
        print(f"  {stat.size_diff / per:7.0f} B {stat.count_diff / per:6.2f} blocks  {stat.traceback[0]}")


def deliver(hub: Any, job_id: str, tenant: str, count: int) -> tuple[float, float]:
    """Hand `count` progress events of the job to the hub; the CPU seconds the hand-overs took, in user
    space and in the kernel (the sockets' writes)."""
    from progress_dispatch import progress_event

    user = system = 0.0
    for seq in range(2, 2 + count):  # the snapshot said seq 1 (queued): each event is the next one
        value = progress_event(job_id, tenant, seq)
        started = os.times()
        hub.dispatch(job_id.encode(), value)
        ended = os.times()
        user += ended.user - started.user
        system += ended.system - started.system
    return user, system


async def measure(args: argparse.Namespace, server: uvicorn.Server, app: Any, url: str, job_id: str) -> None:
    while not server.started:  # noqa: ASYNC110 - uvicorn has no event for it
        await asyncio.sleep(0.1)
    n = args.subscribers
    try:
        warm = await Sockets.open(url, 10)
        await warm.close()
        await all_closed()
        if args.tracemalloc:
            tracemalloc.start(1)
        before = tracemalloc.take_snapshot() if args.tracemalloc else None
        rss_before = rss_kib()
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        sockets = await Sockets.open(url, n)
        cpu_connect, wall_connect = time.process_time() - cpu_before, time.perf_counter() - wall_before
        await asyncio.sleep(SETTLE_S)
        gc.collect()
        rss_connected = rss_kib()
        print(
            f"connect {n}: {wall_connect:.2f} s ({n / wall_connect:.0f}/s); service CPU "
            f"{1000 * cpu_connect / n:.3f} ms per connection; RSS {(rss_connected - rss_before) / n:.1f} KiB "
            f"per connection ({rss_before / 1024:.1f} -> {rss_connected / 1024:.1f} MiB)"
        )
        if before is not None:
            print_allocations(tracemalloc.take_snapshot(), before, n)
        if args.deliver:
            hub = app.app.state.progress.hub
            user, system = deliver(hub, job_id, args.tenant, args.deliver)
            each = 1e6 / (args.deliver * n)
            print(
                f"deliver {args.deliver} events x {n}: {(user + system) * each:.2f} us CPU each "
                f"({user * each:.2f} user, {system * each:.2f} system)"
            )
        await sockets.close()
        await all_closed()
        print(f"all closed: RSS +{(rss_kib() - rss_before) / 1024:.1f} MiB against before connecting")
        if before is not None:
            left = tracemalloc.take_snapshot().compare_to(before, "lineno")
            traced_mib = sum(s.size_diff for s in left) / 1024 / 1024
            print(f"  traced: +{traced_mib:.2f} MiB (tracemalloc's own included)")
        for cycle in range(1, args.cycles + 1):
            sockets = await Sockets.open(url, n)
            await asyncio.sleep(SETTLE_S)
            connected = rss_kib()
            await sockets.close()
            await all_closed()
            print(
                f"round {cycle}: RSS +{(connected - rss_before) / 1024:.1f} MiB connected, "
                f"+{(rss_kib() - rss_before) / 1024:.1f} MiB closed"
            )
        if args.cycles:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(f"after glibc's malloc_trim: RSS +{(rss_kib() - rss_before) / 1024:.1f} MiB")
    finally:
        server.should_exit = True


def run(args: argparse.Namespace) -> int:
    stack = kit.EmbeddedStack(0, None, None)
    kit.console.print("Starting the stack (no workers)...")
    stack.start()
    try:
        stack.wait_ready(kit.DEFAULT_STARTUP_TIMEOUT_S)
        key = stack.api_key()
        job = httpx.post(
            f"{stack.url}/v1/jobs",
            headers={"Authorization": f"Bearer {key}"},
            json={"type": "demo.sleep", "payload": {"seconds": 600, "steps": 10}},
        ).json()
        # This process's progress service, on the stack's database and broker.
        os.environ.update(stack.env())
        os.environ["CONVEYOR_KAFKA_BOOTSTRAP"] = f"{kit.LOCALHOST}:{stack.kafka_port}"
        os.environ["CONVEYOR_API_KEYS"] = f"{args.tenant}:{key}"
        from conveyor.serving import uvicorn_options
        from conveyor.settings import Settings
        from services.progress.app import create_app
        from services.progress.frames import ProgressWebSocketProtocol

        settings = Settings()
        port = kit.free_ports(1, set())
        app = create_app(settings)
        options = uvicorn_options(settings, port, ProgressWebSocketProtocol) | {"host": kit.LOCALHOST}
        config = uvicorn.Config(app, **options)
        server = uvicorn.Server(config)
        url = f"ws://{kit.LOCALHOST}:{port}/v1/jobs/{job['id']}/events?token={key}"

        async def main() -> None:
            await asyncio.gather(server.serve(), measure(args, server, app, url, job["id"]))

        uvloop.run(main())  # as uvicorn runs the service
    finally:
        stack.stop()
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=3000, help="sockets held at once (default 3000)")
    parser.add_argument("--tracemalloc", action="store_true", help="trace the allocations (slow)")
    parser.add_argument("--deliver", type=int, default=0, help="progress events to hand to every socket")
    parser.add_argument("--cycles", type=int, default=0, help="more rounds of connect-all / close-all")
    parser.add_argument("--tenant", default="dev", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        uvloop.run(hold_sockets(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(run(parse_args()))
