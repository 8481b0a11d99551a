"""The fan-out benchmark's client processes: each holds its share of the subscribers, on `wsclient`'s
lean WebSocket, and talks to the benchmark over a pipe.

The conversation, in plain tuples and dicts: the client sends ("ready") once imported; it waits for "go",
connects every subscriber, sends ("connected", stats); then it reads events until every subscription
ended or "stop" arrives, and sends ("done", results). A "storm" in between drops every open socket at
once (a TCP RST: what clients see when a server or a network path dies) and each subscriber resumes on a
new socket with `?after_seq=<the last seq it got>`.

What one message costs here is what the progress service loses of its cores, so the per-message path is
short: every subscriber of a job receives the same bytes for one event, and each distinct payload is
parsed once per process (`MessageCache`); a subscriber keeps the parsed tuple and its receipt time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection, wait
from typing import Any, NamedTuple

import wsclient

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
EVENT_KINDS = frozenset({"state", "progress"})
CONNECT_TIMEOUT_S = 30.0
GREETING_TIMEOUT_S = 30.0  # the first message: a snapshot, or `resumed` on a resume
CLOSE_TIMEOUT_S = 5.0
# Distinct payloads remembered per process; a run's events are far fewer, but a long one is bounded.
MESSAGE_CACHE_MAX = 50_000
# A dropped subscriber tries this many times to resume, waiting a little longer after each failure
# (the server may still count its old socket against the tenant's limit, or refuse at its backlog).
RESUME_ATTEMPTS = 5
RESUME_BACKOFF_S = 0.25
# A slow subscriber (`--slow-clients`): a small receive buffer, and reading paused most of the time
# (`--slow-pause` seconds, then SLOW_READ_S of reading). The server sees it as slow only once its
# kernel buffers and the server's own limit of unsent bytes are full: tens of KiB.
SLOW_RCVBUF_BYTES = 4096
SLOW_READ_S = 0.05


class Parsed(NamedTuple):
    """What the benchmark needs of one message (the same object for every subscriber that got it)."""

    kind: str
    seq: int
    at: float  # an event's `at`, as a timestamp
    is_state: bool
    coalesced_from: int | None
    terminal: bool
    status: str | None  # a snapshot's job status
    last_seq: int | None  # a `resumed` message's
    pruned: bool  # a snapshot sent instead of a replay (`history_pruned`)
    error: str | None  # an `error` message's code (too_many_sockets...)


def parse_message(payload: bytes) -> Parsed:
    message = json.loads(payload)
    kind = str(message.get("type"))
    at = message.get("at")
    coalesced = message.get("coalesced_from")
    status = message.get("status") if kind == "state" else message.get("job", {}).get("status")
    last_seq = message.get("last_seq")
    return Parsed(
        kind=kind,
        seq=int(message.get("seq", -1)),
        at=datetime.fromisoformat(at).timestamp() if isinstance(at, str) else 0.0,
        is_state=kind == "state",
        coalesced_from=None if coalesced is None else int(coalesced),
        terminal=kind == "state" and status in TERMINAL,
        status=status,
        last_seq=None if last_seq is None else int(last_seq),
        pruned=bool(message.get("history_pruned")),
        error=message.get("error") if kind == "error" else None,
    )


class MessageCache:
    """Each distinct payload parsed once: the event's frame is the same bytes for all its subscribers."""

    def __init__(self) -> None:
        self._parsed: dict[bytes, Parsed] = {}

    def parse(self, payload: bytes) -> Parsed:
        hit = self._parsed.get(payload)
        if hit is None:
            if len(self._parsed) >= MESSAGE_CACHE_MAX:
                self._parsed.clear()
            hit = self._parsed[payload] = parse_message(payload)
        return hit


@dataclass(eq=False)
class Subscriber:
    job_id: str
    cache: MessageCache
    slow: bool = False
    socket: wsclient.LeanWebSocket | None = None
    greeting: asyncio.Future[Parsed] | None = None
    connect_s: float | None = None
    error: str | None = None
    snapshot_seq: int | None = None
    snapshot_status: str | None = None
    last_seq: int = 0  # the highest seq it has: its snapshot's, then its events'
    events: list[Parsed] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # time.time() of each event's receipt
    other: Counter[str] = field(default_factory=Counter)
    close_code: int | None = None
    close_reason: str = ""
    terminal: bool = False
    open_at_stop: bool = False
    deflate: bool = False
    # The storm: when its socket was dropped, what it had then, and how its resume went.
    drop_at: float | None = None
    drop_index: int | None = None  # len(events) at the drop: the events after it came on the new socket
    seq_at_drop: int | None = None
    resumed_at: float | None = None  # receipt of `resumed`
    resume_s: float | None = None  # from the drop to `resumed`
    resume_attempts: int = 0
    resume_error: str | None = None
    resume_last_seq: int | None = None  # the job's last seq the server had at the resume
    pruned: bool = False

    def on_message(self, payload: bytes, received: float) -> None:
        parsed = self.cache.parse(payload)
        if parsed.kind in EVENT_KINDS:
            self.events.append(parsed)
            self.received.append(received)
            if parsed.seq > self.last_seq:
                self.last_seq = parsed.seq
            if parsed.terminal:
                self.terminal = True
        elif self.greeting is not None and not self.greeting.done():
            self.greeting.set_result(parsed)
            if parsed.kind == "resumed":
                self.resumed_at = received
        else:
            self.other[parsed.kind] += 1

    def result(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "slow": self.slow,
            "connect_s": self.connect_s,
            "error": self.error,
            "snapshot_seq": self.snapshot_seq,
            "snapshot_status": self.snapshot_status,
            # (seq, at, received, is a state event, coalesced_from or None), in arrival order.
            "events": [
                (e.seq, e.at, received, e.is_state, e.coalesced_from)
                for e, received in zip(self.events, self.received, strict=True)
            ],
            "other": dict(self.other),
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "terminal": self.terminal,
            "open_at_stop": self.open_at_stop,
            "deflate": self.deflate,
            "drop_at": self.drop_at,
            "drop_index": self.drop_index,
            "seq_at_drop": self.seq_at_drop,
            "resumed_at": self.resumed_at,
            "resume_s": self.resume_s,
            "resume_attempts": self.resume_attempts,
            "resume_error": self.resume_error,
            "resume_last_seq": self.resume_last_seq,
            "pruned": self.pruned,
        }


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, wsclient.HandshakeError):
        return f"HTTP {exc.status}" if exc.status else str(exc)
    if isinstance(exc, TimeoutError):
        return "TimeoutError"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} ({os.strerror(exc.errno)})"
    return type(exc).__name__


async def open_socket(sub: Subscriber, plan: dict[str, Any], after_seq: int | None) -> Parsed:
    """Connect `sub` (resuming after `after_seq` if given) and return its first message."""
    url = f"{plan['progress_url']}/v1/jobs/{sub.job_id}/events"
    if after_seq is not None:
        url += f"?after_seq={after_seq}"
    sub.greeting = asyncio.get_running_loop().create_future()
    sub.socket = await wsclient.open_websocket(
        url,
        {"Authorization": f"Bearer {plan['key']}"},
        plan["deflate"],
        sub.on_message,
        CONNECT_TIMEOUT_S,
        rcvbuf=SLOW_RCVBUF_BYTES if sub.slow else None,
    )
    sub.deflate = sub.socket.deflate
    try:
        greeting = sub.greeting
        either: list[asyncio.Future[Any]] = [greeting, sub.socket.closed]
        done, _ = await asyncio.wait(either, timeout=GREETING_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if greeting not in done:
            code = sub.socket.close_code
            raise RuntimeError(
                "no first message" if code is None else f"closed {code} before the first message"
            )
        return greeting.result()
    except BaseException:
        sub.socket.abort()
        raise


async def connect(sub: Subscriber, plan: dict[str, Any]) -> bool:
    """Open `sub`'s first socket and read its snapshot; False (with `sub.error`) if that failed."""
    started = time.perf_counter()
    try:
        first = await open_socket(sub, plan, None)
    except Exception as exc:
        sub.error = error_kind(exc) if not isinstance(exc, RuntimeError) else str(exc)
        return False
    sub.connect_s = time.perf_counter() - started
    if first.kind != "snapshot":
        sub.error = f"error {first.error}" if first.error else f"first message was {first.kind!r}"
        if sub.socket is not None:
            sub.socket.close()
        return False
    sub.snapshot_seq = sub.last_seq = first.seq
    sub.snapshot_status = first.status
    return True


async def resume(sub: Subscriber, plan: dict[str, Any], gate: asyncio.Semaphore) -> bool:
    """After a drop: a new socket with `?after_seq=`, retried a few times; False if it never resumed."""
    assert sub.drop_at is not None
    after_seq = sub.last_seq
    for attempt in range(RESUME_ATTEMPTS):
        if attempt:
            await asyncio.sleep(RESUME_BACKOFF_S * attempt)
        sub.resume_attempts += 1
        try:
            async with gate:
                first = await open_socket(sub, plan, after_seq)
        except Exception as exc:
            sub.resume_error = error_kind(exc) if not isinstance(exc, RuntimeError) else str(exc)
            continue
        if first.kind == "resumed":
            sub.resume_last_seq = first.last_seq
        elif first.kind == "snapshot":  # the history was pruned: the state instead of the missed events
            sub.pruned = True
            sub.resume_last_seq = first.seq
            sub.last_seq = max(sub.last_seq, first.seq)
        else:  # refused (too_many_sockets while the server still counts the dropped socket...): again
            sub.resume_error = f"error {first.error}" if first.error else f"first message was {first.kind!r}"
            if sub.socket is not None:
                sub.socket.abort()
            continue
        sub.resume_error = None
        sub.resume_s = time.time() - sub.drop_at
        return True
    return False


async def read_slowly(socket: wsclient.LeanWebSocket, pause_s: float) -> None:
    """A slow reader on purpose: reading paused for `pause_s`, then on for SLOW_READ_S, until closed."""
    while not socket.closed.done():
        socket.pause_reading()
        await asyncio.wait({socket.closed}, timeout=pause_s)
        socket.resume_reading()
        await asyncio.wait({socket.closed}, timeout=SLOW_READ_S)


async def watch(
    sub: Subscriber, plan: dict[str, Any], gate: asyncio.Semaphore, storm_gate: asyncio.Semaphore
) -> None:
    """One subscriber's sockets until its subscription ends: the first, then one per storm drop."""
    while True:
        socket = sub.socket
        assert socket is not None
        slow = asyncio.create_task(read_slowly(socket, plan["slow_pause_s"])) if sub.slow else None
        await socket.closed
        if slow is not None:
            slow.cancel()
        sub.close_code, sub.close_reason = socket.close_code, socket.close_reason
        if not socket.aborted or sub.terminal:
            return
        if not await resume(sub, plan, storm_gate):
            return


async def run_client(plan: dict[str, Any], conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[str] = asyncio.Queue()

    def on_message() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):  # the benchmark went away
            loop.remove_reader(conn.fileno())
            inbox.put_nowait("stop")

    def send(kind: str, body: dict[str, Any]) -> None:
        # The event loop made the pipe non-blocking for its reader; a big message needs blocking writes.
        os.set_blocking(conn.fileno(), True)
        try:
            conn.send((kind, body))
        finally:
            os.set_blocking(conn.fileno(), False)

    loop.add_reader(conn.fileno(), on_message)
    send("ready", {})
    if await inbox.get() != "go":
        return
    go_at = time.time()
    cache = MessageCache()
    slow = set(plan["slow"])
    subs = [Subscriber(job_id, cache, slow=n in slow) for n, job_id in enumerate(plan["job_ids"])]
    gate = asyncio.Semaphore(plan["connect_concurrency"])
    storm_gate = asyncio.Semaphore(plan["storm_concurrency"])

    async def first_connect(sub: Subscriber) -> bool:
        async with gate:
            return await connect(sub, plan)

    connected = await asyncio.gather(*(first_connect(sub) for sub in subs))
    send("connected", {"go_at": go_at, "connected_at": time.time()})

    tasks = [
        asyncio.create_task(watch(sub, plan, gate, storm_gate))
        for sub, ok in zip(subs, connected, strict=True)
        if ok
    ]
    everyone = asyncio.gather(*tasks)
    storm: dict[str, Any] = {}
    while True:
        order = asyncio.create_task(inbox.get())
        either: list[asyncio.Future[Any]] = [order, everyone]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not order.done():
            order.cancel()
            break
        if order.result() == "storm" and not storm:
            storm = drop_all(subs)
            continue
        break  # "stop"
    if not everyone.done():
        for sub, task in zip([s for s, ok in zip(subs, connected, strict=True) if ok], tasks, strict=True):
            if not task.done():
                sub.open_at_stop = True
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in subs:
            if sub.open_at_stop and sub.socket is not None:
                sub.socket.close()
        closing = [sub.socket.closed for sub in subs if sub.open_at_stop and sub.socket is not None]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S)
    loop.remove_reader(conn.fileno())
    done_at = time.time()
    send("done", {"subscribers": [sub.result() for sub in subs], "done_at": done_at, "storm": storm})


def drop_all(subs: list[Subscriber]) -> dict[str, Any]:
    """The storm: every open socket whose subscription is not over is aborted, all in one go."""
    drop_at = time.time()
    dropped = 0
    for sub in subs:
        socket = sub.socket
        if socket is None or socket.closed.done() or sub.terminal:
            continue
        sub.drop_at = drop_at
        sub.drop_index = len(sub.events)
        sub.seq_at_drop = sub.last_seq
        socket.abort()
        dropped += 1
    return {"drop_at": drop_at, "dropped": dropped, "abort_s": time.time() - drop_at}


def raise_nofile_limit() -> int:
    """Raise the soft limit of open files to the hard limit (one socket per subscriber); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def client_process(plan: dict[str, Any], conn: Connection) -> None:
    """Entry point of a client process (spawned: a fresh interpreter, no state inherited)."""
    raise_nofile_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops its clients itself
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_client(plan, conn))
    conn.close()


class Clients:
    """The client processes, seen from the benchmark."""

    def __init__(self, plans: list[dict[str, Any]]) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for plan in plans:
            ours, theirs = context.Pipe()
            process = context.Process(target=client_process, args=(plan, theirs), daemon=True)
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def broadcast(self, message: str) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    async def gather(self, kind: str, timeout_s: float | None) -> list[dict[str, Any] | None]:
        """Each client's next message, which must be `kind`; None for a client that died or timed out."""
        return await asyncio.to_thread(self._gather, kind, timeout_s)

    def _gather(self, kind: str, timeout_s: float | None) -> list[dict[str, Any] | None]:
        answers: dict[int, dict[str, Any] | None] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = {conn: n for n, conn in enumerate(self.conns)}
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(pending.keys()), timeout=remaining)
            if not ready:
                break
            for conn in ready:
                assert isinstance(conn, Connection)
                n = pending.pop(conn)
                try:
                    got, body = conn.recv()
                except (EOFError, OSError):
                    answers[n] = None
                    continue
                if got != kind:
                    raise RuntimeError(f"client {n} sent {got!r}, expected {kind!r}")
                answers[n] = body
        return [answers.get(n) for n in range(len(self.conns))]

    def stop(self) -> None:
        self.broadcast("stop")
        for process in self.processes:
            process.join(timeout=CLOSE_TIMEOUT_S * 2)
            if process.is_alive():
                process.kill()
                process.join()
