"""What one connection is sent: for each job it watches, a snapshot (or a replay from the history
when it resumes), then each newer event, in `seq` order, each once.

The live events come from the hub through the connection's channel. They may arrive out of order or
with holes (a client away, events published by different processes, an orphan published late); the
job's history in the database fills any hole, and an event at or below the last `seq` sent is a
repeat and dropped. So a client sees 1, 2, 3... with no gap and no repeat, whatever Kafka did.
"""

from __future__ import annotations

import functools
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.auth import Principal
from conveyor.eventlog import events_between
from conveyor.events import JobEvent
from conveyor.jobstore import active_jobs
from conveyor.metrics import EVENT_DELIVERY_TALLY
from conveyor.models import JobRecord
from conveyor.schemas import resource_document
from services.progress.channel import (
    Channel,
    Item,
    QueuedEvent,
    Reply,
    StreamEnd,
    Subscribe,
    SubscribeAll,
    Unsubscribe,
    UnsubscribeAll,
)
from services.progress.fanout import Transport
from services.progress.state import ProgressState

# WebSocket close codes. 4000-4999 are the application's own: the client asked for something wrong,
# the job is unknown to its tenant, it fell behind and should reconnect with `after_seq`, or its tenant
# holds as many sockets as it may (HTTP's 429).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNKNOWN_JOB = 4404
CLOSE_FELL_BEHIND = 4008
CLOSE_TOO_MANY = 4429

# A `subscribe all` snapshot lists at most this many unfinished jobs, newest first.
ALL_JOBS_SNAPSHOT_LIMIT = 1000
# Jobs one connection may watch by id, counting the ids it asked for that are not its tenant's: each
# of those cost a database read once, and is answered from memory after that.
MAX_SUBSCRIPTIONS = 1000
# With `subscribe all`, the last seq sent is remembered for this many jobs (the most recent ones).
MAX_TRACKED_JOBS = 10_000


@dataclass(frozen=True)
class Outgoing:
    """A message ready for the wire: its JSON text, and the type and seq an SSE frame is labelled with."""

    type: str
    seq: int | None
    text: str

    @classmethod
    def of(cls, message: dict[str, Any]) -> Outgoing:
        seq = message.get("seq") if message["type"] == "snapshot" else None
        return cls(message["type"], seq, json.dumps(message))

    @classmethod
    def of_event(cls, event: JobEvent, first_seq: int) -> Outgoing:
        if first_seq < event.seq:
            # This progress event stands for first_seq..seq: its text is this client's own.
            message = {**event.model_dump(mode="json"), "coalesced_from": first_seq}
            return cls(event.type, event.seq, json.dumps(message))
        # The same text for every subscriber: serialized once per event, not once per client.
        return cls(event.type, event.seq, event.as_json())


Send = Callable[[Outgoing], Awaitable[None]]


class DirectWrites(Protocol):
    """Writes straight to a connection's socket (`frames.DirectWriter`); each False if the socket
    cannot take it at once, and nothing was written."""

    def write(self, event: JobEvent) -> bool:
        """One live event."""

    def write_all(self, events: Sequence[JobEvent]) -> bool:
        """Several events (a resume's replay, a job's events from one fetch), in one write."""

    def writable_transport(self) -> Transport | None:
        """The socket's transport if it can take a write now, for a fan-out to write to."""


FELL_BEHIND = StreamEnd(CLOSE_FELL_BEHIND, "fell behind: reconnect with after_seq")


def error_message(error: str, detail: str, **fields: Any) -> dict[str, Any]:
    return {"type": "error", "error": error, "detail": detail, **fields}


def snapshot_message(job: JobRecord, events_url: str) -> dict[str, Any]:
    resource = resource_document(job, events_url)
    return {"type": "snapshot", "job_id": job.id, "seq": job.last_seq, "job": resource}


class EventStream:
    """Sends one connection what its channel holds, in order. With `single_job`, the stream ends
    once that job's terminal event is sent (or the job is unknown); else it runs until its channel
    overflows (`FELL_BEHIND`), is stopped, or the stream is cancelled."""

    def __init__(
        self,
        state: ProgressState,
        principal: Principal,
        channel: Channel,
        send: Send,
        *,
        single_job: bool = False,
        direct: DirectWrites | None = None,
    ) -> None:
        self._hub = state.hub
        self._db = state.db
        self._snapshots = state.snapshots
        self._events_url = state.settings.progress_url
        self._principal = principal
        self._channel = channel
        self._send = send
        self._single_job = single_job
        self._watched: set[str] = set()
        # Ids asked for that are not the tenant's jobs. Job ids are made by the gateway before it
        # answers, so an id unknown once stays unknown: asking again costs no database read.
        self._unknown: set[str] = set()
        self._all = False
        # The last seq sent, per job.
        self._cursors: OrderedDict[str, int] = OrderedDict()
        # Handling an item (awaiting a send or a read): an event offered meanwhile must queue behind it.
        self._busy = True
        # Events written straight to the socket while it keeps up, and a resume's replay in one write.
        self._direct = direct
        # How the stream will end, once the hub is quiet (`_end_soon`).
        self._ending: StreamEnd | None = None
        if direct is not None:
            channel.direct = self._offer_direct
            channel.direct_all = self._offer_direct_all
            channel.rides = self._rides
            channel.rode = self._rode

    @property
    def idle(self) -> bool:
        """Watching nothing, and not about to end for another reason (`_end_soon`)."""
        return not self._watched and not self._all and self._ending is None

    async def run(self) -> StreamEnd:
        try:
            while True:
                self._busy = False
                self._ride_fanouts()
                item = await self._channel.get()
                self._busy = True
                if isinstance(item, StreamEnd):
                    return item
                if self._channel.overflowed:
                    return FELL_BEHIND
                end = await self._handle(item)
                if end is not None:
                    return end
        finally:
            self._busy = True
            self._channel.direct = self._channel.direct_all = None
            self._channel.rides = self._channel.rode = None
            self._leave()

    def _offer_direct(self, event: JobEvent) -> bool:
        """Write the event at once if it is the next one of a watched job and the stream waits on an
        empty queue; False leaves it to the queue. A job's terminal event is written at once too, and
        its subscription ends here: a one-job stream is then stopped, once the hub is quiet."""
        direct = self._direct_for(event)
        if direct is None or not direct.write(event):
            return False
        end = self._sent_live(event)
        if end is not None:
            self._end_soon(end)
        return True

    def _offer_direct_all(self, events: Sequence[JobEvent]) -> bool:
        """Write a job's events, consecutive seqs, in one go (one system call, not one each), as
        `_offer_direct` writes one: if the first is the next one of a watched job and the stream
        waits on an empty queue. False leaves them to the queue."""
        direct = self._direct_for(events[0])
        if direct is None or not direct.write_all(events):
            return False
        for event in events:
            end = self._sent_live(event)
            if end is not None:
                self._end_soon(end)
                break
        return True

    def _direct_for(self, event: JobEvent) -> DirectWrites | None:
        """The direct writer, if `event` may go through it now: the stream waits on an empty queue,
        and the event is the next one of a job it watches."""
        if self._busy or self._direct is None:
            return None
        cursor = self._cursors.get(event.job_id)
        return self._direct if cursor is not None and event.seq == cursor + 1 else None

    def _ride_fanouts(self) -> None:
        """The stream waits from here: its jobs' next events may be written by their fan-outs."""
        if self._direct is None or self._all or self._ending is not None or len(self._channel):
            return
        for job_id in self._watched:
            cursor = self._cursors.get(job_id)
            if cursor is not None:
                self._hub.ride(job_id, self._channel, cursor)

    def _rides(self, job_id: str, seq: int) -> Transport | None:
        """The socket's transport, if the job's fan-out may write its events from `seq` on: the stream
        waits on an empty queue, watches the job by id, and was sent it up to `seq`. A `subscribe
        all` stream keeps its cursors its own way (`_advance`), and is not a rider."""
        if self._busy or self._all or self._direct is None or self._ending is not None:
            return None
        if job_id not in self._watched or self._cursors.get(job_id) != seq:
            return None
        return self._direct.writable_transport()

    def _rode(self, job_id: str, seq: int, terminal: bool) -> None:
        """The job's fan-out wrote the events up to `seq` (and `terminal`: the job's terminal event)."""
        if job_id not in self._watched:
            return
        self._advance(job_id, seq)
        if terminal:
            end = self._finished(job_id)
            if end is not None:
                self._end_soon(end)

    def _end_soon(self, end: StreamEnd) -> None:
        """End the stream once the hub is quiet: the hub is handing out an event now, maybe to
        thousands of sockets, and waking each stream to close would hold up the rest."""
        self._ending = end
        self._hub.when_quiet(functools.partial(self._channel.stop, end))

    async def _handle(self, item: Item) -> StreamEnd | None:
        match item:
            case QueuedEvent():
                return await self._forward(item)
            case Subscribe(job_ids=job_ids, after_seq=after_seq):
                for job_id in job_ids:
                    end = await self._subscribe(job_id, after_seq.get(job_id))
                    if end is not None:
                        return end
            case Unsubscribe(job_ids=job_ids):
                for job_id in job_ids:
                    self._unwatch(job_id)
                await self._say({"type": "unsubscribed", "job_ids": list(job_ids)})
            case SubscribeAll():
                await self._subscribe_all()
            case UnsubscribeAll():
                self._hub.unwatch_tenant(self._principal.tenant, self._channel)
                self._all = False
                for job_id in [job_id for job_id in self._cursors if job_id not in self._watched]:
                    del self._cursors[job_id]
                await self._say({"type": "unsubscribed", "all": True})
            case Reply(message=message):
                await self._say(message)
        return None

    async def _subscribe(self, job_id: str, after_seq: int | None) -> StreamEnd | None:
        if job_id in self._unknown:
            return await self._unknown_job(job_id)
        if job_id not in self._watched and len(self._watched) + len(self._unknown) >= MAX_SUBSCRIPTIONS:
            detail = f"at most {MAX_SUBSCRIPTIONS} jobs, counting ids that are not jobs of yours"
            await self._say(error_message("too_many_subscriptions", detail, job_id=job_id))
            return None
        # Watch first, read second: an event newer than what is read below is sure to be queued.
        self._hub.watch_job(job_id, self._channel)
        self._watched.add(job_id)
        tenant = self._principal.tenant
        # Shared with the other subscribers asking at the same moment (`snapshots`).
        if after_seq is None:
            job, replay = await self._snapshots.job(tenant, job_id), None
        else:
            job, replay = await self._snapshots.resume(tenant, job_id, after_seq)
        if job is None:
            self._unwatch(job_id)
            self._unknown.add(job_id)
            return await self._unknown_job(job_id)
        if after_seq is not None and not 0 <= after_seq <= job.last_seq:
            self._unwatch(job_id)
            detail = f"after_seq must be between 0 and the job's last seq, {job.last_seq}"
            await self._say(error_message("invalid_after_seq", detail, job_id=job_id))
            return StreamEnd(CLOSE_BAD_REQUEST, "invalid after_seq") if self._single_job else None
        if after_seq is None or (replay is None and after_seq < job.last_seq):
            # A fresh subscription, or a resume whose history was pruned: the current state instead.
            snapshot = snapshot_message(job, self._events_url)
            if after_seq is not None:
                snapshot["history_pruned"] = True
            await self._say(snapshot)
        else:
            await self._say(
                {"type": "resumed", "job_id": job_id, "after_seq": after_seq, "last_seq": job.last_seq}
            )
            if replay and (self._direct is None or not self._direct.write_all(replay)):
                for event in replay:
                    await self._deliver(event, event.seq)
        self._advance(job_id, job.last_seq)
        if job.status.is_terminal:
            return self._finished(job_id)
        return None

    async def _unknown_job(self, job_id: str) -> StreamEnd | None:
        await self._say(error_message("unknown_job", "no such job", job_id=job_id))
        return StreamEnd(CLOSE_UNKNOWN_JOB, "unknown job") if self._single_job else None

    async def _subscribe_all(self) -> None:
        tenant = self._principal.tenant
        self._hub.watch_tenant(tenant, self._channel)
        self._all = True
        jobs = await self._db.read(
            functools.partial(active_jobs, tenant=tenant, limit=ALL_JOBS_SNAPSHOT_LIMIT + 1)
        )
        listed = jobs[:ALL_JOBS_SNAPSHOT_LIMIT]
        for job in reversed(listed):
            if job.id not in self._cursors:
                self._advance(job.id, job.last_seq)
        await self._say(
            {
                "type": "snapshot",
                "all": True,
                "jobs": [snapshot_message(job, self._events_url) for job in listed],
                "truncated": len(jobs) > len(listed),
            }
        )

    async def _forward(self, item: QueuedEvent) -> StreamEnd | None:
        event = item.event
        cursor = self._cursors.get(event.job_id)
        if cursor is None:
            if not self._all:
                return None  # no longer watched
            cursor = 0  # a job first seen under `subscribe all`: from its first event
        if event.seq <= cursor:
            return None  # sent already: in a snapshot, a replay, or a republished repeat
        first_seq = max(item.first_seq, cursor + 1)
        if first_seq > cursor + 1:
            # A hole: events that have not arrived (yet). The history has them, committed before this one.
            missing = await self._db.read(
                functools.partial(
                    events_between,
                    job_id=event.job_id,
                    after_seq=cursor,
                    upto_seq=first_seq - 1,
                    tenant=self._principal.tenant,
                )
            )
            for earlier in missing or ():
                await self._deliver(earlier, earlier.seq)
        await self._deliver(event, first_seq)
        # A live event only: those filled in from the history above are late by design. For a WebSocket
        # the send has written the frame; for an SSE stream it has handed it to the response.
        return self._sent_live(event)

    async def _say(self, message: dict[str, Any]) -> None:
        await self._send(Outgoing.of(message))

    async def _deliver(self, event: JobEvent, first_seq: int) -> None:
        await self._send(Outgoing.of_event(event, first_seq))

    def _sent_live(self, event: JobEvent) -> StreamEnd | None:
        """A live event is out (queued path or direct write): its delivery latency, the job's cursor,
        and, if it was the terminal event of a job watched by id, the end of that subscription."""
        EVENT_DELIVERY_TALLY.observe(max(0.0, time.time() - event.at_s))
        self._advance(event.job_id, event.seq)
        if event.is_terminal and event.job_id in self._watched:
            return self._finished(event.job_id)
        return None

    def _advance(self, job_id: str, seq: int) -> None:
        self._cursors[job_id] = seq
        if not self._all:
            return  # only the watched jobs are tracked, at most MAX_SUBSCRIPTIONS: none to forget
        self._cursors.move_to_end(job_id)
        while len(self._cursors) > MAX_TRACKED_JOBS:
            oldest = next(job for job in self._cursors if job not in self._watched)
            del self._cursors[oldest]

    def _finished(self, job_id: str) -> StreamEnd | None:
        """The job reached a terminal state: its subscription is over."""
        self._unwatch(job_id)
        return StreamEnd(CLOSE_NORMAL) if self._single_job else None

    def _unwatch(self, job_id: str) -> None:
        self._hub.unwatch_job(job_id, self._channel)
        self._watched.discard(job_id)
        if not self._all:
            self._cursors.pop(job_id, None)

    def _leave(self) -> None:
        for job_id in list(self._watched):
            self._hub.unwatch_job(job_id, self._channel)
        if self._all:
            self._hub.unwatch_tenant(self._principal.tenant, self._channel)
