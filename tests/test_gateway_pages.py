"""Pages are cut by bytes as well as by count: the job list and a job's JSON event history end early when
their items would pass CONVEYOR_MAX_PAGE_BYTES, and say where the rest begins; nothing is lost."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from harness import KEY_A, Stack, submit, wait_for_status

MAX_PAGE_BYTES = 4096
# Each job's result is this long, so a page of the 8 jobs (about 8 x 2 KiB) would pass the cap.
RESULT_CHARS = 1500
JOBS = 8
pytestmark = pytest.mark.stack_settings(CONVEYOR_MAX_PAGE_BYTES=MAX_PAGE_BYTES)


def item_bytes(items: list[Any]) -> int:
    return len(httpx.Response(200, json=items).content)


async def test_a_job_list_page_ends_early_at_the_byte_cap_and_goes_on(stack: Stack) -> None:
    batch = uuid.uuid4().hex[:8]
    async with stack.client() as client:
        created = [
            await submit(client, {"type": "demo.echo", "payload": "x" * RESULT_CHARS, "labels": {"b": batch}})
            for _ in range(JOBS)
        ]
        for job in created:
            await wait_for_status(client, job["id"], {"succeeded"}, 60)

        seen: list[str] = []
        url = client.build_request("GET", "/v1/jobs", params={"label": f"b={batch}", "limit": JOBS}).url
        pages = 0
        while True:
            page = (await client.get(url)).json()
            pages += 1
            assert page["items"], "a page is never empty"
            assert len(page["items"]) == 1 or item_bytes(page["items"]) <= MAX_PAGE_BYTES
            seen.extend(item["id"] for item in page["items"])
            if page["next_cursor"] is None:
                break
            url = page["next"]
    assert pages > 1, "the cap never cut a page"
    assert seen == [job["id"] for job in reversed(created)]  # every job once, newest first


async def test_an_event_history_page_ends_early_at_the_byte_cap(stack: Stack) -> None:
    async with stack.client() as client:
        job = await submit(client, {"type": "demo.sleep", "payload": {"seconds": 0.5, "steps": 30}})
        await wait_for_status(client, job["id"], {"succeeded"}, 60)
    url = f"{stack.progress_url.replace('ws://', 'http://')}/v1/jobs/{job['id']}/events"
    seqs: list[int] = []
    pages = 0
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30) as client:
        while True:
            page = (await client.get(url, params={"after_seq": seqs[-1] if seqs else 0})).json()
            pages += 1
            assert page["events"], "a page is never empty"
            assert len(page["events"]) == 1 or item_bytes(page["events"]) <= MAX_PAGE_BYTES
            seqs.extend(event["seq"] for event in page["events"])
            if seqs[-1] == page["last_seq"]:
                break
    assert pages > 1, "the cap never cut a page"
    assert seqs == list(range(1, seqs[-1] + 1))
