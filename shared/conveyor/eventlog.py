"""A job's event history: every event is stored with the change it announces, so any gap a live
stream has (a client away, a progress instance restarted, events reaching Kafka out of order) can be
filled from the database.

Events are written to the history by `conveyor.changes`, with the change each announces. The history
of a job is complete from seq 1 to the job's `last_seq` until it is pruned, some time
after the job finished (`CONVEYOR_EVENT_HISTORY_S`).
"""

from __future__ import annotations

from sqlalchemy import exists, select

from conveyor.events import JobEvent
from conveyor.jobstore import Reader
from conveyor.models import Job, JobEventRecord


def events_between(
    connection: Reader, job_id: str, after_seq: int, upto_seq: int, *, tenant: str
) -> list[JobEvent] | None:
    """The job's events after `after_seq` up to `upto_seq`, in order; None if some were pruned.
    Only the tenant's own job has a history for it: another tenant's reads as pruned, so a caller
    that did not check whose job it is still cannot hand out another tenant's events."""
    if upto_seq <= after_seq:
        return []
    owned = exists().where(Job.id == job_id, Job.tenant == tenant)
    query = (
        select(JobEventRecord.body)
        .where(
            JobEventRecord.job_id == job_id,
            JobEventRecord.seq > after_seq,
            JobEventRecord.seq <= upto_seq,
            owned,
        )
        .order_by(JobEventRecord.seq)
    )
    events = [JobEvent.from_json(body.encode()) for body in connection.execute(query).scalars().all()]
    if len(events) != upto_seq - after_seq:
        return None
    return events
