"""The spans of one job message on a worker, when tracing is on (`conveyor.tracing`).

`process <topic>` (a consumer span) continues the trace in the message's headers, from the moment a
slot takes the job to its recorded outcome. Inside it: `claim` (the claim's transaction, shared with
the other jobs claimed at once), `handler <type>` (the handler running; it is the current span inside
the handler, so a handler's own spans nest in it), and `record` (writing the outcome). The messages
each of them causes carry its context: the `running` event the claim's, progress events the handler's,
the outcome's event (and a retry's job message, or the dead letter) the record's.

Nothing here runs while tracing is off: `JobSpans.begin` answers None, and the worker skips the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from conveyor import tracing
from conveyor.models import JobRecord
from services.worker.intake import Pending


@dataclass(slots=True)
class JobSpans:
    process: Span
    claim: Span
    handler: Span | None = None
    # The handler span's carrier, made once: every progress report of the attempt carries it.
    handler_carrier: str | None = field(default=None)

    @classmethod
    def begin(cls, pending: Pending, worker_id: str) -> JobSpans | None:
        """The job's spans, its claim starting now; None when not tracing."""
        if not tracing.enabled():
            return None
        message = pending.message
        process = tracing.start_child(
            f"process {pending.tp.topic}",
            pending.trace,
            SpanKind.CONSUMER,
            {
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": pending.tp.topic,
                "messaging.destination.partition.id": str(pending.tp.partition),
                "messaging.kafka.offset": pending.offset,
                "conveyor.job.id": message.job_id,
                "conveyor.job.type": message.type,
                "conveyor.worker.id": worker_id,
            },
        )
        return cls(process, tracing.child_of(process, "claim"))

    @property
    def claim_carrier(self) -> str | None:
        return tracing.carrier_of(self.claim)

    def claimed(self, job: JobRecord | None) -> None:
        """The claim committed: the job is this worker's (its attempt number), or it was not claimable
        (no longer queued: a repeat or a stale message), which ends the job's spans here."""
        self.claim.end()
        if job is None:
            self.process.set_attribute("conveyor.job.skipped", True)
            self.process.end()
        else:
            self.process.set_attribute("conveyor.job.attempt", job.attempts)

    def claim_failed(self, exc: BaseException) -> None:
        """The database did not take the claim: the job waits in the intake, and its next try is a
        process span of its own."""
        _failed(self.claim, exc)
        self.claim.end()
        _failed(self.process, exc)
        self.process.end()

    def handler_started(self, job_type: str) -> Span:
        self.handler = tracing.child_of(self.process, f"handler {job_type}")
        self.handler_carrier = tracing.carrier_of(self.handler)
        return self.handler

    def handler_ended(self, ending: str) -> None:
        if self.handler is not None:
            self.handler.set_attribute("conveyor.attempt.ending", ending)
            self.handler.end()

    def record(self) -> Span:
        return tracing.child_of(self.process, "record")

    def end(self) -> None:
        self.process.end()


def _failed(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
