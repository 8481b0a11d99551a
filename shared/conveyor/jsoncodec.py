"""JSON in and out, with orjson: responses, events, job messages and the database's JSON columns.

Times come out as pydantic writes them (`2026-12-01T09:00:00.123456Z`), so a document is the same
whether a model or a plain dict produced it. What orjson refuses and JSON allows (integers past 64
bits) falls back to the standard library, so no valid payload is turned away here.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson
from starlette.responses import JSONResponse

DUMPS_OPTIONS = orjson.OPT_UTC_Z


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=DUMPS_OPTIONS)
    except TypeError:
        return json.dumps(value, default=_fallback, ensure_ascii=False, separators=(",", ":")).encode()


def encoded(value: Any) -> tuple[orjson.Fragment, int]:
    """`value` as JSON now, and its size in bytes: for a value that must be measured before it is
    stored (a payload, a result). `dumps` writes the fragment as it is, so the value is encoded once
    however many times a document holding it is written (the database's column included)."""
    data = dumps(value)
    return orjson.Fragment(data), len(data)


def dumps_text(value: Any) -> str:
    return dumps(value).decode()


def loads(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson refuses integers past 64 bits, which the standard library reads.
        return json.loads(text)


def _fallback(value: Any) -> Any:
    if isinstance(value, datetime):
        return orjson.loads(orjson.dumps(value, option=DUMPS_OPTIONS))
    raise TypeError(f"{type(value).__name__} is not JSON")


class FastJSONResponse(JSONResponse):
    """A JSON response rendered with orjson."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
