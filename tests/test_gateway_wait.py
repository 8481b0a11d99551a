"""`?wait=` long polls: served from the events topic, not by polling the database per request; capped per
tenant; answered as soon as the job changes state."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path

import httpx

from harness import (
    KEY_A,
    Stack,
    assert_problem,
    counted_gateway,
    eventually,
    select_rate,
    selects,
    sleep_job,
    submit,
    wait_for_status,
)

WAITERS = 40
# Reads a second that K waiters may add, whatever K: a watch's read per status change and per fallback.
MAX_EXTRA_READS_PER_S = 3.0
# An answer must follow the job's end by less than this (the fallback read comes every 5 s).
ANSWERED_WITHIN_S = 1.5


async def test_waiters_on_one_job_cost_no_reads_each_are_capped_and_answered_at_once(
    stack: Stack, tmp_path: Path
) -> None:
    counted, stats_dir = await counted_gateway(
        stack, "gateway-counted", tmp_path, CONVEYOR_TENANT_MAX_WAITING=str(WAITERS)
    )
    async with stack.client() as client:
        # Progress twice a second while it runs: events that change no status wake no waiter.
        job = await submit(client, sleep_job(10, steps=20))
        await wait_for_status(client, job["id"], {"running"}, 60)
    url = f"/v1/jobs/{job['id']}"

    async with stack.client(KEY_A, base_url=counted) as client:
        idle = await select_rate(stats_dir)
        answered_at: list[float] = []

        async def wait_for_the_end() -> dict[str, object]:
            response = await client.get(url, params={"wait": 30})
            answered_at.append(time.time())
            assert response.status_code == 200, response.text
            body: dict[str, object] = response.json()
            return body

        before = selects(stats_dir)
        waiters = [asyncio.create_task(wait_for_the_end()) for _ in range(WAITERS)]
        # Each request reads the job once, then waits at once: after those reads, every one waits.
        await eventually(lambda: selects(stats_dir) >= before + WAITERS, 30, "every waiter's first read")
        waiting = await select_rate(stats_dir)
        assert not any(task.done() for task in waiters), "the job ended during the measurement"
        assert waiting - idle <= MAX_EXTRA_READS_PER_S, (
            f"{WAITERS} waiters cost {waiting - idle:.1f} reads/s ({idle:.1f} idle, {waiting:.1f} waiting)"
        )
        refused = await client.get(url, params={"wait": 1})
        over = assert_problem(refused, 429)  # the tenant's cap is full
        assert over["limit"] == "max_waiting" and int(refused.headers["retry-after"]) > 0

        answers = await asyncio.gather(*waiters)
    assert {answer["status"] for answer in answers} == {"succeeded"}
    finished = datetime.fromisoformat(str(answers[0]["finished_at"])).timestamp()
    latest = max(answered_at) - finished
    assert latest < ANSWERED_WITHIN_S, f"the last waiter was answered {latest:.1f} s after the job ended"

    async with httpx.AsyncClient(base_url=counted, headers={"Authorization": f"Bearer {KEY_A}"}) as client:
        assert (await client.get(url, params={"wait": 30})).json()["status"] == "succeeded"  # at once
