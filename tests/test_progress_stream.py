"""The progress service's event stream (`services.progress.streams.EventStream`), in process: a real
database, an event hub that is never started (the test hands it events as Kafka would), and a send
that records each message. A failure here names the stream, not a line in a service's log."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from websockets.frames import Frame
from websockets.streams import StreamReader

from conveyor import changes
from conveyor.auth import ALL_SCOPES, Authenticator, Principal
from conveyor.changes import NewJob
from conveyor.database import Database
from conveyor.events import JobEvent, event_json
from conveyor.models import JobRecord
from conveyor.schemas import resource_document
from conveyor.settings import Settings
from services.progress import hub as hub_module
from services.progress.channel import Channel, Reply, Subscribe, SubscribeAll, UnsubscribeAll
from services.progress.fanout import Fanout
from services.progress.hub import QUIET_CALLBACKS_PER_TURN, QUIET_MAX_WAIT_S, QUIET_S, EventHub
from services.progress.state import ProgressState
from services.progress.streams import (
    CLOSE_BAD_REQUEST,
    CLOSE_NORMAL,
    CLOSE_UNKNOWN_JOB,
    EventStream,
    Outgoing,
    StreamEnd,
)

from harness import eventually, write_now

PREFIX = "stream-test"
EVENTS_URL = "ws://progress.test"
WAIT_S = 10.0
TENANT = Principal("t", ALL_SCOPES)
OTHER_TENANT = Principal("other", ALL_SCOPES)
Message = dict[str, Any]


def progress_state(db: Database) -> ProgressState:
    settings = Settings(progress_public_url=EVENTS_URL, progress_client_queue=100)
    # Never started: it reads no topic, and `dispatch` stands in for the records it would have read.
    hub = EventHub("unused:9092", PREFIX)
    return ProgressState(settings, db, hub, Authenticator(db, {}))


class Client:
    """One connection's stream, and what it has been sent so far."""

    def __init__(self, state: ProgressState, principal: Principal = TENANT, *, single_job: bool) -> None:
        self.channel = Channel(state.settings.progress_client_queue, principal.tenant)
        self._sent: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.stream = EventStream(state, principal, self.channel, self._sent.put, single_job=single_job)
        self.task = asyncio.create_task(self.stream.run())

    async def receive(self) -> Message:
        outgoing = await asyncio.wait_for(self._sent.get(), WAIT_S)
        message: Message = json.loads(outgoing.text)
        return message

    async def receive_many(self, count: int) -> list[Message]:
        return [await self.receive() for _ in range(count)]

    async def end(self) -> StreamEnd:
        return await asyncio.wait_for(self.task, WAIT_S)

    def nothing_sent(self) -> bool:
        return self._sent.empty()

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def written(db: Database, change: changes.Change) -> JobRecord:
    [[result]] = (await write_now(db, PREFIX, change)).results
    assert result.written and result.job is not None, result
    return result.job


async def new_job(db: Database, tenant: str = TENANT.tenant) -> JobRecord:
    return await written(db, NewJob(tenant=tenant, type="demo.echo", payload={}, priority=3, max_attempts=2))


def publish(state: ProgressState, job: JobRecord, kind: Literal["state", "progress"] = "state") -> None:
    """The job's latest event, as the hub reads it from the events topic."""
    state.hub.dispatch(job.id.encode(), event_json(job, kind))


class RecordedWrites:
    """Direct writes to a socket that always takes them, recorded by seq: each write, a list of seqs.
    A fan-out's writes (raw frames, to `writable_transport`) are recorded the same way."""

    def __init__(self, *, live: bool = True) -> None:
        self.live = live
        self.writes: list[list[int]] = []

    def writable_transport(self) -> FrameRecorder | None:
        return FrameRecorder(self.writes) if self.live else None

    def write(self, event: JobEvent) -> bool:
        if self.live:
            self.writes.append([event.seq])
        return self.live

    def write_all(self, events: Sequence[JobEvent]) -> bool:
        self.writes.append([event.seq for event in events])
        return True


class FrameRecorder:
    """A transport that records the seqs of the events in each write's text frames (in `writes`), and
    can be made slow (`buffered`) or closing."""

    def __init__(self, writes: list[list[int]] | None = None) -> None:
        self.writes: list[list[int]] = [] if writes is None else writes
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append([json.loads(payload)["seq"] for payload in frame_payloads(data)])

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def frame_payloads(data: bytes) -> list[bytes]:
    """The payloads of unmasked text frames written one after the other."""
    reader = StreamReader()
    reader.feed_data(data)
    payloads = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
            raise AssertionError("a frame is incomplete")
        except StopIteration as done:
            payloads.append(done.value.data)
    return payloads


def seqs(messages: list[Message]) -> list[tuple[str, int]]:
    return [(message["type"], message["seq"]) for message in messages]


async def test_one_job_gets_its_snapshot_its_events_and_ends_with_its_terminal_event(db: Database) -> None:
    state = progress_state(db)
    queued = await new_job(db)
    client = Client(state, single_job=True)
    client.channel.request(Subscribe((queued.id,)))
    snapshot = await client.receive()
    assert snapshot == {
        "type": "snapshot",
        "job_id": queued.id,
        "seq": 1,
        "job": json.loads(json.dumps(resource_document(queued, EVENTS_URL))),
    }

    running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
    publish(state, running)
    reported = await written(db, changes.progress(queued.id, 1, 50.0, "half"))
    publish(state, reported, "progress")
    done = await written(db, changes.complete(reported, {"ok": True}))
    publish(state, done)

    events = await client.receive_many(3)
    assert seqs(events) == [("state", 2), ("progress", 3), ("state", 4)]
    assert events[1]["progress"] == {"percent": 50.0, "message": "half"}
    assert events[2]["status"] == "succeeded" and events[2]["result"] == {"ok": True}
    assert await client.end() == StreamEnd(CLOSE_NORMAL)
    publish(state, done)  # the stream left the hub: nothing is queued for it any more
    assert len(client.channel) == 0


async def test_a_hole_is_filled_from_the_history_and_a_late_repeat_is_dropped(db: Database) -> None:
    state = progress_state(db)
    queued = await new_job(db)
    client = Client(state, single_job=True)
    client.channel.request(Subscribe((queued.id,)))
    assert (await client.receive())["type"] == "snapshot"

    running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
    reported = await written(db, changes.progress(queued.id, 1, 10.0, None))
    publish(state, reported, "progress")  # event 2 has not arrived (yet)
    assert seqs(await client.receive_many(2)) == [("state", 2), ("progress", 3)]

    publish(state, running)  # event 2 after all, late: sent already, from the history
    done = await written(db, changes.complete(reported, None))
    publish(state, done)
    assert seqs([await client.receive()]) == [("state", 4)]
    assert await client.end() == StreamEnd(CLOSE_NORMAL)
    assert client.nothing_sent()


async def test_a_resume_replays_the_events_after_the_seq_given(db: Database) -> None:
    state = progress_state(db)
    queued = await new_job(db)
    await written(db, changes.claim(queued.id, "w1", lease_s=30))
    await written(db, changes.progress(queued.id, 1, 10.0, None))
    client = Client(state, single_job=True)
    try:
        client.channel.request(Subscribe((queued.id,), {queued.id: 1}))
        resumed, *replayed = await client.receive_many(3)
        assert resumed == {"type": "resumed", "job_id": queued.id, "after_seq": 1, "last_seq": 3}
        assert seqs(replayed) == [("state", 2), ("progress", 3)]
        assert client.nothing_sent()
    finally:
        await client.close()


async def test_another_tenants_job_is_an_unknown_job(db: Database) -> None:
    state = progress_state(db)
    theirs = await new_job(db, tenant=OTHER_TENANT.tenant)
    client = Client(state, single_job=True)
    client.channel.request(Subscribe((theirs.id,)))
    assert await client.receive() == {
        "type": "error",
        "error": "unknown_job",
        "detail": "no such job",
        "job_id": theirs.id,
    }
    assert await client.end() == StreamEnd(CLOSE_UNKNOWN_JOB, "unknown job")


async def test_a_channel_is_offered_only_its_own_tenants_events_whatever_it_watches(db: Database) -> None:
    state = progress_state(db)
    theirs = await new_job(db, tenant=OTHER_TENANT.tenant)
    client = Client(state, single_job=False)
    try:
        client.channel.request(SubscribeAll())
        assert (await client.receive())["type"] == "snapshot"
        # What a subscribe does while it reads whose job an id is: the id is watched before the answer.
        state.hub.watch_job(theirs.id, client.channel)
        publish(state, theirs)
        publish(state, await written(db, changes.claim(theirs.id, "w1", lease_s=30)))
        assert len(client.channel) == 0
        client.channel.request(Reply({"type": "pong"}))
        assert await client.receive() == {"type": "pong"}  # nothing of theirs was queued before it
    finally:
        await client.close()


class Offered:
    """A listener that records the seqs it is offered."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.seqs: list[int] = []

    def offer(self, event: JobEvent) -> None:
        self.seqs.append(event.seq)

    def offer_all(self, events: Sequence[JobEvent]) -> None:
        self.seqs.extend(event.seq for event in events)

    def ride(self, fanout: Fanout) -> None:
        return None  # offered every event

    def left_fanout(self, job_id: str, seq: int, terminal: bool) -> None:
        raise AssertionError("never rode")


async def test_a_jobs_events_go_to_its_tenants_watchers_only_and_not_after_they_unwatch(db: Database) -> None:
    state = progress_state(db)
    job = await new_job(db)
    ours, also_ours, theirs = Offered(TENANT.tenant), Offered(TENANT.tenant), Offered(OTHER_TENANT.tenant)
    for listener in (ours, also_ours, theirs):
        state.hub.watch_job(job.id, listener)
    publish(state, job)
    state.hub.unwatch_job(job.id, ours)
    state.hub.unwatch_job(job.id, theirs)  # a tenant's last watcher of the job goes: nothing breaks
    publish(state, await written(db, changes.claim(job.id, "w1", lease_s=30)))
    assert (ours.seqs, also_ours.seqs, theirs.seqs) == ([1], [1, 2], [])


async def test_an_after_seq_past_the_jobs_last_seq_is_refused(db: Database) -> None:
    state = progress_state(db)
    queued = await new_job(db)
    client = Client(state, single_job=True)
    client.channel.request(Subscribe((queued.id,), {queued.id: 5}))
    error = await client.receive()
    assert (error["error"], error["job_id"]) == ("invalid_after_seq", queued.id)
    assert await client.end() == StreamEnd(CLOSE_BAD_REQUEST, "invalid after_seq")


async def test_all_of_a_tenants_jobs_from_a_snapshot_then_new_jobs_from_their_first_event(
    db: Database,
) -> None:
    state = progress_state(db)
    waiting = await new_job(db)
    client = Client(state, single_job=False)
    try:
        client.channel.request(SubscribeAll())
        snapshot = await client.receive()
        assert (snapshot["type"], snapshot["all"], snapshot["truncated"]) == ("snapshot", True, False)
        assert [job["job_id"] for job in snapshot["jobs"]] == [waiting.id]

        publish(state, await new_job(db, tenant=OTHER_TENANT.tenant))  # not this tenant's
        later = await new_job(db)
        publish(state, later)
        publish(state, waiting)  # in the snapshot already
        event = await client.receive()
        assert (event["job_id"], event["seq"], event["status"]) == (later.id, 1, "queued")

        client.channel.request(UnsubscribeAll())
        assert await client.receive() == {"type": "unsubscribed", "all": True}
        publish(state, await written(db, changes.claim(later.id, "w1", lease_s=30)))
        assert len(client.channel) == 0 and client.nothing_sent()
    finally:
        await client.close()


@dataclass
class DirectStream:
    """A one-job stream whose socket takes every direct write, past its snapshot and waiting."""

    state: ProgressState
    job: JobRecord
    sent: asyncio.Queue[Outgoing]
    direct: RecordedWrites
    task: asyncio.Task[StreamEnd]
    channel: Channel


async def direct_stream(db: Database) -> DirectStream:
    state = progress_state(db)
    queued = await new_job(db)
    channel = Channel(state.settings.progress_client_queue, TENANT.tenant)
    sent: asyncio.Queue[Outgoing] = asyncio.Queue()
    direct = RecordedWrites()
    stream = EventStream(state, TENANT, channel, sent.put, single_job=True, direct=direct)
    task = asyncio.create_task(stream.run())
    channel.request(Subscribe((queued.id,)))
    assert json.loads((await asyncio.wait_for(sent.get(), WAIT_S)).text)["type"] == "snapshot"
    await eventually(lambda: not stream._busy, WAIT_S, "the stream waiting on its queue again")
    return DirectStream(state, queued, sent, direct, task, channel)


async def test_a_terminal_event_written_directly_ends_a_one_job_stream_after_it_is_out(db: Database) -> None:
    opened = await direct_stream(db)
    state, queued, sent, direct, task = opened.state, opened.job, opened.sent, opened.direct, opened.task
    running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
    publish(state, running)
    done = await written(db, changes.complete(running, {"ok": True}))
    publish(state, done)  # the terminal event: written at once, and the stream ends after it
    assert direct.writes == [[2], [3]]
    assert await asyncio.wait_for(task, WAIT_S) == StreamEnd(CLOSE_NORMAL)
    assert sent.empty()  # nothing went through the queue after the snapshot
    publish(state, done)  # the stream left the hub
    assert direct.writes == [[2], [3]]


async def test_a_stream_given_a_request_leaves_the_fanout_at_the_seq_it_was_written(
    db: Database,
) -> None:
    opened = await direct_stream(db)
    state, queued, sent, direct, task = opened.state, opened.job, opened.sent, opened.direct, opened.task
    try:
        running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
        publish(state, running)
        reported = await written(db, changes.progress(queued.id, 1, 50.0, "half"))
        publish(state, reported, "progress")
        assert direct.writes == [[2], [3]]
        [[(_, fanout)]] = [list(tenants.items()) for tenants in state.hub._by_job.values()]
        assert fanout.rides(opened.channel)  # written by the job's fan-out, not offered
        opened.channel.request(Reply({"type": "pong"}))
        assert json.loads((await asyncio.wait_for(sent.get(), WAIT_S)).text) == {"type": "pong"}
        publish(state, reported, "progress")  # a repeat: the stream knows it was sent 3, and drops it
        again = await written(db, changes.progress(queued.id, 1, 75.0, "more"))
        publish(state, again, "progress")
        assert direct.writes == [[2], [3], [4]]
        await eventually(lambda: fanout.rides(opened.channel), WAIT_S, "the stream riding again")
        assert sent.empty()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_resumes_replay_goes_out_in_one_write_after_its_resumed_message(db: Database) -> None:
    state = progress_state(db)
    queued = await new_job(db)
    running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
    reported = await written(db, changes.progress(queued.id, 1, 50.0, "half"))
    channel = Channel(state.settings.progress_client_queue, TENANT.tenant)
    sent: asyncio.Queue[Outgoing] = asyncio.Queue()
    direct = RecordedWrites(live=False)
    stream = EventStream(state, TENANT, channel, sent.put, single_job=True, direct=direct)
    task = asyncio.create_task(stream.run())
    try:
        channel.request(Subscribe((queued.id,), {queued.id: 1}))
        resumed = json.loads((await asyncio.wait_for(sent.get(), WAIT_S)).text)
        assert resumed == {
            "type": "resumed",
            "job_id": queued.id,
            "after_seq": 1,
            "last_seq": reported.last_seq,
        }
        assert direct.writes == [[running.last_seq, reported.last_seq]]  # 2 and 3, in one write
        assert sent.empty()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def fetched(state: ProgressState, *events: tuple[JobRecord, Literal["state", "progress"]]) -> None:
    """Each (job, kind): the job's latest event, all in one fetch from the events topic, in this order."""
    records = [
        ConsumerRecord(PREFIX, 0, n, 0, 0, job.id.encode(), event_json(job, kind), None, 0, 0, ())
        for n, (job, kind) in enumerate(events)
    ]
    state.hub.dispatch_fetched({TopicPartition(PREFIX, 0): records})


async def test_a_jobs_events_from_one_fetch_go_out_in_one_write_and_the_stream_ends_once_the_hub_is_quiet(
    db: Database,
) -> None:
    opened = await direct_stream(db)
    state, queued, sent, direct, task = opened.state, opened.job, opened.sent, opened.direct, opened.task
    running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
    done = await written(db, changes.complete(running, {"ok": True}))
    loop = asyncio.get_running_loop()
    handed_out = loop.time()
    fetched(state, (running, "state"), (done, "state"))
    assert direct.writes == [[running.last_seq, done.last_seq]]  # both, in one write
    assert await asyncio.wait_for(task, WAIT_S) == StreamEnd(CLOSE_NORMAL)
    # The stream was stopped once the hub had handed out nothing for a while, not at once.
    assert loop.time() - handed_out >= QUIET_S
    assert sent.empty()


async def test_a_fetch_whose_events_of_a_job_do_not_follow_on_goes_out_one_by_one(db: Database) -> None:
    opened = await direct_stream(db)
    state, queued, sent, direct, task = opened.state, opened.job, opened.sent, opened.direct, opened.task
    try:
        running = await written(db, changes.claim(queued.id, "w1", lease_s=30))
        reported = await written(db, changes.progress(queued.id, 1, 50.0, "half"))
        # 3 before 2, as a republished event may come.
        fetched(state, (reported, "progress"), (running, "state"))
        # 3 is not next, so it queues, and 2 queues behind it: the stream fills 2 in from the history,
        # sends 3, and drops the queued 2 as a repeat.
        messages = [json.loads((await asyncio.wait_for(sent.get(), WAIT_S)).text) for _ in range(2)]
        assert seqs(messages) == [("state", running.last_seq), ("progress", reported.last_seq)]
        assert direct.writes == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_what_waits_for_a_quiet_hub_runs_in_order_once_it_has_handed_out_nothing_for_a_while() -> None:
    hub = EventHub("unused:9092", PREFIX)
    loop = asyncio.get_running_loop()
    record = ConsumerRecord(PREFIX, 0, 0, 0, 0, b"nobody-watches", b"{}", None, 0, 0, ())
    hub.dispatch_fetched({TopicPartition(PREFIX, 0): [record]})
    handed_out = loop.time()
    ran: list[tuple[int, float]] = []
    count = 3 * QUIET_CALLBACKS_PER_TURN
    for n in range(count):
        hub.when_quiet(functools.partial(lambda n: ran.append((n, loop.time())), n))
    await eventually(lambda: len(ran) == count, WAIT_S, "every callback to run")
    assert [n for n, _ in ran] == list(range(count))
    assert min(at for _, at in ran) - handed_out >= QUIET_S


async def test_what_waits_for_a_quiet_hub_runs_after_a_second_at_most_however_busy_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Never quiet: a spell of QUIET_S after each event, longer than the test. (An event every few
    # milliseconds would do it too, until a loaded machine holds the loop up for QUIET_S.)
    monkeypatch.setattr(hub_module, "QUIET_S", 10 * (QUIET_MAX_WAIT_S + WAIT_S))
    hub = EventHub("unused:9092", PREFIX)
    loop = asyncio.get_running_loop()
    record = ConsumerRecord(PREFIX, 0, 0, 0, 0, b"nobody-watches", b"{}", None, 0, 0, ())
    ran: list[float] = []
    asked = loop.time()
    hub.when_quiet(lambda: ran.append(loop.time()))
    while not ran:
        assert loop.time() - asked < QUIET_MAX_WAIT_S + WAIT_S, "the callback never ran"
        hub.dispatch_fetched({TopicPartition(PREFIX, 0): [record]})
        await asyncio.sleep(QUIET_S / 4)
    assert ran[0] - asked >= QUIET_MAX_WAIT_S
