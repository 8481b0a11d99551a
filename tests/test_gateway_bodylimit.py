"""Request bodies are limited before anything reads them: a huge body to any route, with no key, is a 413
and costs the gateway no memory (the body is never buffered, by FastAPI or by a route)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from conveyor.settings import Settings
from conveyor.sizes import max_submission_bytes
from services.gateway.bodylimit import MAX_BATCH_BODY_BYTES

from harness import Stack, assert_problem

# A submission's body limit under the default settings: a payload at its limit and the rest.
MAX_BODY_BYTES = max_submission_bytes(Settings())
JOB_ID = "0b5e3f0e-6c1b-4a63-9d83-6b1c1d1f2a10"
POST_ROUTES = ["/v1/jobs", "/v1/jobs/batch", f"/v1/jobs/{JOB_ID}/cancel", f"/v1/jobs/{JOB_ID}/retry"]
HUGE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
# What all those uploads together may add to the gateway's peak memory.
MAX_GROWTH_BYTES = 16 * 1024 * 1024
JSON = "application/json"
# The body limits concern no database: one kind is enough.
pytestmark = pytest.mark.parametrize("database_kind", ["sqlite"], indirect=True)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM): a body buffered and freed still shows in it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def chunks(total: int) -> AsyncIterator[bytes]:
    """A body of `total` bytes with no `Content-Length`: httpx sends it chunked."""
    block = b"x" * CHUNK_BYTES
    for _ in range(total // CHUNK_BYTES):
        yield block


async def test_huge_bodies_to_every_post_route_are_refused_unread(stack: Stack) -> None:
    pid = stack.processes["gateway"].pid
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as client:
        for path in POST_ROUTES:  # warm each route up: its first request may allocate for good
            await client.post(path, json={})
        before = peak_rss_bytes(pid)
        for path in POST_ROUTES:
            declared = await client.post(path, content=b"x" * HUGE_BYTES)
            body = assert_problem(declared, 413)
            assert body["type"] == "urn:conveyor:problem:body-too-large", path
            chunked = await client.post(path, content=chunks(HUGE_BYTES))
            assert "content-length" not in chunked.request.headers
            # Counted as it is read: a route that refuses the request before reading (no key) reads
            # none of it; the retry route's declared body is read (by FastAPI) first, so it is a 413.
            assert_problem(chunked, 413 if path.endswith("/retry") else 401)
    growth = peak_rss_bytes(pid) - before
    assert growth < MAX_GROWTH_BYTES, f"the gateway's peak memory grew by {growth / 2**20:.1f} MiB"


async def test_bodies_within_the_limit_still_reach_the_route(stack: Stack) -> None:
    # Not near the limit: a message that large is another finding's (the producer's own limit).
    single = b'{"type": "demo.echo", "payload": "' + b"x" * (MAX_BODY_BYTES // 4) + b'"}'
    # The batch route has its own, larger limit: 1.2 MiB in all.
    batch = orjson.dumps({"jobs": [{"type": "demo.echo", "payload": "x" * 60_000} for _ in range(20)]})
    limits = [("/v1/jobs", single, MAX_BODY_BYTES), ("/v1/jobs/batch", batch, MAX_BATCH_BODY_BYTES)]
    async with stack.client() as client:
        for path, within, limit in limits:
            accepted = await client.post(path, content=_pieces(within), headers={"Content-Type": JSON})
            assert accepted.status_code == 202, (path, accepted.text)
            assert_problem(await client.post(path, content=b"x" * (limit + 1)), 413)
            over_chunked = await client.post(path, content=chunks(HUGE_BYTES), headers={"Content-Type": JSON})
            assert_problem(over_chunked, 413)


async def _pieces(body: bytes) -> AsyncIterator[bytes]:
    """`body` in a few pieces, chunked."""
    for start in range(0, len(body), 256 * 1024):
        yield body[start : start + 256 * 1024]
