"""The Python cost of one delivery on the progress service's direct path, with no socket under it.

It prints figures and asserts nothing. In this process: an `EventHub` that is never started, and
``--subscribers`` channels with their `EventStream`, each past its snapshot and waiting, each with a
`DirectWriter` over a stand-in transport whose `write` and checks are C calls that do nothing. Then
``--rounds`` times, one progress event of each of ``--jobs`` jobs is handed to the hub, as a fetch
from Kafka would be, and written to every subscriber of its job. What one round costs
(`time.process_time`), over the subscribers, is the Python part of a delivery:
`progress_memory.py --deliver` measures the same path with real sockets, kernel included, where the
VM's noise is larger than a few hundred nanoseconds.

    python bench/progress_dispatch.py [--subscribers 10000] [--jobs 20] [--rounds 30]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from conveyor.events import JobEvent, Progress
from conveyor.lifecycle import JobState
from services.progress.channel import Channel
from services.progress.frames import DirectWriter
from services.progress.hub import EventHub
from services.progress.streams import EventStream

TENANT = "bench"


# Every frame written, by any transport: `list.append` is a C call too.
WRITTEN: list[bytes] = []


class NullTransport:
    """What `DirectWriter` and a fan-out ask of a transport, each a C call that does next to nothing."""

    __slots__ = ()
    is_closing = staticmethod(bool)  # bool() is False
    get_write_buffer_size = staticmethod(int)  # int() is 0
    write = staticmethod(WRITTEN.append)


class OpenProtocol:
    """What `DirectWriter` asks of uvicorn's protocol: an open socket, our close not sent."""

    def __init__(self) -> None:
        self.close_sent = False
        self.disconnected = False
        self.transport = NullTransport()


def waiting_stream(hub: EventHub, job_id: str) -> tuple[Channel, EventStream]:
    """A one-job stream as it is once its snapshot (seq 1) is out and it waits on an empty queue."""
    state: Any = SimpleNamespace(hub=hub, db=None, snapshots=None, settings=SimpleNamespace(progress_url=""))
    channel = Channel(100, TENANT)
    writer: Any = DirectWriter(OpenProtocol())  # type: ignore[arg-type]
    stream = EventStream(state, SimpleNamespace(tenant=TENANT), channel, None, single_job=True, direct=writer)  # type: ignore[arg-type]
    # What `run` and `_subscribe` leave behind (private: there is no socket to subscribe through).
    stream._busy = False
    stream._cursors[job_id] = 1
    stream._watched.add(job_id)
    hub.watch_job(job_id, channel)
    return channel, stream


def progress_event(job_id: str, tenant: str, seq: int) -> bytes:
    """A progress event of the job, as it is on the events topic."""
    event = JobEvent(
        job_id=job_id,
        tenant=tenant,
        seq=seq,
        type="progress",
        status=JobState.RUNNING,
        progress=Progress(percent=float(min(seq, 100))),
        attempt=1,
        at=datetime.now(UTC),
    )
    return event.as_json().encode()


def run(subscribers: int, jobs: int, rounds: int) -> list[float]:
    """Microseconds of CPU per delivery, one figure per round."""
    hub = EventHub("unused:9092", "bench")
    job_ids = [str(uuid.uuid4()) for _ in range(jobs)]
    streams = [waiting_stream(hub, job_ids[i % jobs]) for i in range(subscribers)]
    gc.collect()
    gc.freeze()  # as `conveyor.collector` does once a service has started
    per_delivery = []
    for seq in range(2, 2 + rounds):
        values = [(job_id, progress_event(job_id, TENANT, seq)) for job_id in job_ids]
        started = time.process_time()
        for job_id, value in values:
            hub.dispatch(job_id.encode(), value)
        per_delivery.append((time.process_time() - started) / subscribers * 1e6)
    assert len(WRITTEN) == subscribers * rounds, "every event was written straight to its socket"
    WRITTEN.clear()
    del streams
    return per_delivery


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args.subscribers, args.jobs, args.rounds)
    print(
        f"{args.subscribers} subscribers of {args.jobs} jobs, {args.rounds} rounds: Python per delivery "
        f"median {statistics.median(figures):.2f} us, min {min(figures):.2f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
