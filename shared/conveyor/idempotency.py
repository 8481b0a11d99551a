"""Idempotency keys: a retried submission with the same `Idempotency-Key` gets the same job.

A key belongs to a tenant and lives for a published window (`CONVEYOR_IDEMPOTENCY_WINDOW_S`, 24 h by
default). It is remembered in the same transaction as the job it created (`conveyor.changes`), under
a primary key on (tenant, key): of two identical requests racing, the database lets exactly one
record it, and the other is answered with the winner's job. A request that reuses a key with another
body is refused, since answering it with the first job would silently drop what the client asked for.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from conveyor.schemas import MAX_IDEMPOTENCY_KEY_LENGTH

MAX_KEY_LENGTH = MAX_IDEMPOTENCY_KEY_LENGTH


def fingerprint(body: Any) -> str:
    """SHA-256 of the request body in canonical JSON: key order and whitespace do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_key(header: str) -> str | None:
    """The key from the header, as a bare token or as the draft's quoted structured-field string.
    None if it is empty, too long, or not printable ASCII."""
    key = header.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_KEY_LENGTH or not all(" " <= char <= "~" for char in key):
        return None
    return key
