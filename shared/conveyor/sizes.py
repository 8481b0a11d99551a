"""How large the things a job carries may be, and the Kafka message sizes that follow.

Every message on Kafka has one field that grows with what a tenant or a handler sent: a dead letter
carries the job's payload, a `succeeded` event its result. The rest of a message (ids, times, the
error, the progress message, the labels) is bounded here, so a message is never larger than the larger
of the two limits (`CONVEYOR_MAX_PAYLOAD_BYTES`, `CONVEYOR_MAX_RESULT_BYTES`) plus
`MESSAGE_ENVELOPE_BYTES`; the producer's `max_request_size` and the topics' `max.message.bytes` are
set from that. A message Kafka still refuses is taken out of the outbox's way (`conveyor.outbox`).
"""

from __future__ import annotations

from conveyor.settings import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_RESULT_BYTES, Settings

# Texts that go into events and dead letters are cut at these lengths (in characters): an error's
# type and message, a kept traceback (`CONVEYOR_EXPOSE_TRACEBACKS`), and a progress message.
MAX_ERROR_TYPE_CHARS = 200
MAX_ERROR_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 4000
MAX_PROGRESS_MESSAGE_CHARS = 1000
# What cut text ends with.
ELLIPSIS = "…"
# Room for everything in a message but its payload or result. JSON may spend up to 6 bytes on a
# character (`\u0001`), so the error's texts take at most 37 KiB, 16 labels at most 26 KiB and the
# progress message 6 KiB; ids, times and field names are a few hundred bytes.
MESSAGE_ENVELOPE_BYTES = 128 * 1024
# Room in a submission's body for everything but its payload (type, labels, schedule, whitespace).
SUBMISSION_ENVELOPE_BYTES = 64 * 1024
# What Kafka adds to a message (the record batch's header, the record's, the key): the topics take
# this much more than the producer sends, so whatever the producer lets through the broker accepts.
RECORD_OVERHEAD_BYTES = 1024
# The sizes that follow from the default limits, for callers without settings (tests, tools).
DEFAULT_MAX_MESSAGE_BYTES = max(DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_RESULT_BYTES) + MESSAGE_ENVELOPE_BYTES
DEFAULT_TOPIC_MAX_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES + RECORD_OVERHEAD_BYTES
# The error type of an attempt whose handler returned a result over `CONVEYOR_MAX_RESULT_BYTES`.
RESULT_TOO_LARGE = "result_too_large"


class ResultTooLarge(Exception):
    """A handler's result is larger, as JSON, than `CONVEYOR_MAX_RESULT_BYTES`: its attempt fails."""

    error_type = RESULT_TOO_LARGE

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the result is {size} bytes as JSON, over the limit of {limit} bytes (CONVEYOR_MAX_RESULT_BYTES)"
        )
        self.size = size
        self.limit = limit


def truncated(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in an ellipsis when it was cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def max_message_bytes(settings: Settings) -> int:
    """The largest message the producer sends: a payload or a result at its limit, and the rest."""
    return max(settings.max_payload_bytes, settings.max_result_bytes) + MESSAGE_ENVELOPE_BYTES


def topic_max_message_bytes(settings: Settings) -> int:
    """The topics' `max.message.bytes`: the producer's largest message and Kafka's framing of it."""
    return max_message_bytes(settings) + RECORD_OVERHEAD_BYTES


def max_submission_bytes(settings: Settings) -> int:
    """The body limit of `POST /v1/jobs`: a payload at its limit and the rest of the submission."""
    return settings.max_payload_bytes + SUBMISSION_ENVELOPE_BYTES
