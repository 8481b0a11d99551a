"""`GET /v1/jobs`: the query's filters and its page cursors.

A cursor is the `(created_at, id)` of the last job of a page, opaque to clients (base64 of JSON).
Pages are keyset-paginated on that pair, so a page never repeats or skips a job when new jobs arrive
between requests (they are newer, so they sort before the first page).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from urllib.parse import urlencode

from conveyor.jobstore import JobFilter, is_job_id
from conveyor.lifecycle import JobState
from conveyor.models import JobView
from conveyor.problems import invalid_field

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# Values one filter parameter may repeat (`?label=a=1&label=b=2...`): each is a condition of the
# query, and a request of thousands of them would cost the database far more than it is worth.
MAX_FILTER_VALUES = 20


def encode_cursor(job: JobView) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        position = datetime.fromisoformat(created_at), str(job_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise invalid_field("cursor", "not a cursor from a previous page of this list") from None
    if position[0].tzinfo is None or not is_job_id(position[1]):
        raise invalid_field("cursor", "not a cursor from a previous page of this list")
    return position


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`["customer=acme", "batch=7"]` -> `{"customer": "acme", "batch": "7"}`."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise invalid_field("label", f"{pair!r} is not key=value")
        labels[key] = value
    return labels


def job_filter(
    statuses: list[JobState],
    types: list[str],
    priorities: list[int],
    labels: list[str],
    created_after: datetime | None,
    created_before: datetime | None,
) -> JobFilter:
    for name, values in (("status", statuses), ("type", types), ("priority", priorities), ("label", labels)):
        if len(values) > MAX_FILTER_VALUES:
            raise invalid_field(name, f"at most {MAX_FILTER_VALUES} values, got {len(values)}")
    return JobFilter(
        statuses=statuses,
        types=types,
        priorities=priorities,
        labels=parse_labels(labels),
        created_after=created_after,
        created_before=created_before,
    )


def next_page_url(path: str, query: list[tuple[str, str]], cursor: str) -> str:
    """The same request with the next page's cursor."""
    kept = [(name, value) for name, value in query if name != "cursor"]
    return f"{path}?{urlencode([*kept, ('cursor', cursor)])}"
