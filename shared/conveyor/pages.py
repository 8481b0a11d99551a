"""Pages of a listing (the gateway's jobs, the progress service's event history) cut by bytes as well as
by count: a page of up to N items of up to a few MiB each would otherwise be a response of gigabytes.

Each item is encoded once, as the page would have encoded it, and only until the page is full; the
page's JSON is then put together around the encoded items, so the cap costs no second encoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.responses import Response

from conveyor.jsoncodec import dumps


def encoded_within(documents: Iterable[Any], max_bytes: int) -> list[bytes]:
    """The documents as JSON, in order, as many as fit in `max_bytes` together (`CONVEYOR_MAX_PAGE_BYTES`).
    The first one always: a page is never empty, so that every item can be reached."""
    encoded: list[bytes] = []
    size = 0
    for document in documents:
        item = dumps(document)
        size += len(item) + 1  # and its comma
        if encoded and size > max_bytes:
            break
        encoded.append(item)
    return encoded


def page_response(fields: dict[str, Any], name: str, items: list[bytes]) -> Response:
    """A JSON object of `fields` and, under `name`, the list of already encoded items."""
    head = dumps(fields)[:-1]  # the object without its closing brace
    separator = b"," if fields else b""
    body = b"".join((head, separator, dumps(name), b":[", b",".join(items), b"]}"))
    return Response(body, media_type="application/json")
