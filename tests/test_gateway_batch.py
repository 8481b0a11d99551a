"""`POST /v1/jobs/batch`: up to 1,000 jobs created together or not at all, each with its own idempotency
key if it wants one, within the tenant's rate and queue limits; on both databases."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from harness import KEY_A, KEY_B, Stack, assert_problem, eventually, nothing_waiting, run_cli, wait_for_status

TERMINAL = {"succeeded", "failed", "canceled"}
BATCH_LIMIT = 1000
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024


def marked(marker: str, n: int, **fields: Any) -> dict[str, Any]:
    """A demo.echo job labelled with the test's marker, so the test can list exactly its own jobs."""
    return {"type": "demo.echo", "payload": {"n": n}, "labels": {"marker": marker}, **fields}


async def jobs_marked(client: httpx.AsyncClient, marker: str) -> list[dict[str, Any]]:
    page = (await client.get("/v1/jobs", params={"label": f"marker={marker}", "limit": 200})).json()
    items: list[dict[str, Any]] = page["items"]
    return items


async def test_a_batch_is_accepted_whole_in_request_order_and_every_job_runs(module_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    body = {"jobs": [marked(marker, n, priority=1 + n % 5) for n in range(20)]}
    async with module_stack.client() as client:
        response = await client.post("/v1/jobs/batch", json=body)
        assert response.status_code == 202, response.text
        assert int(response.headers["retry-after"]) >= 1
        accepted = response.json()
        items = accepted["items"]
        assert [item["priority"] for item in items] == [1 + n % 5 for n in range(20)], "request order"
        assert accepted["replayed"] == []
        for item in items:
            assert item["status"] == "queued" and item["links"]["self"] == f"/v1/jobs/{item['id']}"
            assert (await client.get(item["links"]["self"])).json()["id"] == item["id"]
        finals = [await wait_for_status(client, item["id"], TERMINAL, 60) for item in items]
    assert [(final["status"], final["result"]) for final in finals] == [
        ("succeeded", {"n": n}) for n in range(20)
    ]


async def test_one_invalid_item_refuses_the_batch_naming_every_item_and_field(module_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    jobs = [
        marked(marker, 0),
        {"type": "no.such.type", "labels": {"marker": marker}},
        marked(marker, 2, priority=9),
        {"type": "demo.sleep", "payload": {"seconds": "long"}, "labels": {"marker": marker}},
        marked(marker, 4, delay_s=5, run_at="2030-01-01T00:00:00Z"),
        marked(marker, 5),
    ]
    async with module_stack.client() as client:
        problem = assert_problem(await client.post("/v1/jobs/batch", json={"jobs": jobs}), 422)
        fields = [error["field"] for error in problem["errors"]]  # type: ignore[attr-defined]
        assert fields == ["jobs[1].type", "jobs[2].priority", "jobs[3].payload.seconds", "jobs[4].delay_s"]
        assert await jobs_marked(client, marker) == [], "nothing was created, the valid items neither"


async def test_malformed_batches_are_refused(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        for body, field in [
            ({"jobs": []}, "jobs"),
            ({}, "jobs"),
            ({"jobs": [{"type": "demo.noop"}], "extra": 1}, "extra"),
            ({"jobs": [{"type": "demo.noop"}] * (BATCH_LIMIT + 1)}, "jobs"),
            ({"jobs": [{"type": "demo.noop"}, "not a job"]}, "jobs[1]"),
            ({"jobs": [{"type": "demo.noop", "idempotency_key": ""}]}, "jobs[0].idempotency_key"),
            ({"jobs": [{"type": "demo.noop", "idempotency_key": "caf\u00e9"}]}, "jobs[0].idempotency_key"),
        ]:
            problem = assert_problem(await client.post("/v1/jobs/batch", json=body), 422)
            assert [error["field"] for error in problem["errors"]] == [field], (body, problem)  # type: ignore[attr-defined]
        assert_problem(
            await client.post("/v1/jobs/batch", content=b"[", headers={"content-type": "application/json"}),
            400,
        )
        assert_problem(
            await client.post("/v1/jobs/batch", content=b"{}", headers={"content-type": "text/plain"}), 415
        )
        header = await client.post(
            "/v1/jobs/batch", json={"jobs": [{"type": "demo.noop"}]}, headers={"Idempotency-Key": "k"}
        )
        assert assert_problem(header, 422)["errors"][0]["field"] == "Idempotency-Key"  # type: ignore[index]
        huge = b'{"jobs": [{"type": "demo.echo", "payload": "' + b"x" * MAX_BATCH_BODY_BYTES + b'"}]}'
        assert_problem(
            await client.post("/v1/jobs/batch", content=huge, headers={"content-type": "application/json"}),
            413,
        )


async def test_each_item_has_its_own_idempotency_key(module_stack: Stack) -> None:
    marker = uuid.uuid4().hex
    keys = [f"{marker}-{n}" for n in range(3)]
    jobs = [marked(marker, n, idempotency_key=key) for n, key in enumerate(keys)]
    async with module_stack.client() as client:
        first = await client.post("/v1/jobs/batch", json={"jobs": jobs})
        assert first.status_code == 202, first.text
        ids = [item["id"] for item in first.json()["items"]]

        again = await client.post("/v1/jobs/batch", json={"jobs": [*jobs, marked(marker, 3)]})
        assert again.status_code == 202, again.text
        assert [item["id"] for item in again.json()["items"]][:3] == ids, (
            "the keyed jobs are answered, not made again"
        )
        assert again.json()["replayed"] == [0, 1, 2]

        # The same key with another job in it: the batch is refused, naming the item; nothing is created.
        changed = [marked(marker, 10), marked(marker, 11, idempotency_key=keys[1])]
        problem = assert_problem(await client.post("/v1/jobs/batch", json={"jobs": changed}), 422)
        assert [error["field"] for error in problem["errors"]] == ["jobs[1].idempotency_key"]  # type: ignore[attr-defined]
        assert len(await jobs_marked(client, marker)) == 4

        # Two items of one batch with the same key and job: one job.
        twice = [marked(marker, 20, idempotency_key="twice"), marked(marker, 20, idempotency_key="twice")]
        both = (await client.post("/v1/jobs/batch", json={"jobs": twice})).json()
        assert both["items"][0]["id"] == both["items"][1]["id"] and both["replayed"] == [1]

        # Keys belong to the tenant: another tenant's batch with the same keys creates its own jobs.
        async with module_stack.client(KEY_B) as other:
            theirs = await other.post("/v1/jobs/batch", json={"jobs": jobs})
            assert theirs.status_code == 202 and not set(item["id"] for item in theirs.json()["items"]) & set(
                ids
            )


async def test_a_batch_is_within_the_tenants_rate_and_queue_limits_or_refused_whole(
    module_stack: Stack,
) -> None:
    limits = {"tenant-a": {"submit_rate": 1, "submit_burst": 5}, "tenant-b": {"max_queued": 4}}
    base = module_stack.start_gateway("gateway-batch-limited", CONVEYOR_TENANT_LIMITS=json.dumps(limits))
    marker = uuid.uuid4().hex
    try:
        await module_stack.wait_ready(base)
        async with (
            module_stack.client(KEY_A, base_url=base) as a,
            module_stack.client(KEY_B, base_url=base) as b,
        ):
            # Every job takes a token: a batch larger than the burst could never pass; one that fits, once.
            too_big = assert_problem(
                await a.post("/v1/jobs/batch", json={"jobs": [marked(marker, n) for n in range(6)]}), 422
            )
            assert too_big["errors"][0]["field"] == "jobs"  # type: ignore[index]
            assert (
                await a.post("/v1/jobs/batch", json={"jobs": [marked(marker, n) for n in range(4)]})
            ).status_code == 202
            limited = assert_problem(
                await a.post("/v1/jobs/batch", json={"jobs": [marked(marker, n) for n in range(2)]}), 429
            )
            assert limited["limit"] == "rate"

            # tenant-b may have 4 jobs waiting: with 3 scheduled, a batch of 2 does not fit: refused whole.
            await eventually(lambda: nothing_waiting(b), 60, "tenant-b's earlier jobs to leave the queue")
            held = [marked(marker, n, delay_s=300) for n in range(3)]
            assert (await b.post("/v1/jobs/batch", json={"jobs": held})).status_code == 202
            full = assert_problem(
                await b.post("/v1/jobs/batch", json={"jobs": [marked(marker, 7), marked(marker, 8)]}), 429
            )
            assert full["limit"] == "max_queued"
            assert len(await jobs_marked(b, marker)) == 3, "none of the refused batch was created"
            assert (await b.post("/v1/jobs/batch", json={"jobs": [marked(marker, 9)]})).status_code == 202
            for job in await jobs_marked(b, marker):
                await b.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        module_stack.stop("gateway-batch-limited")


async def test_a_batch_needs_a_key_with_the_submit_scope(module_stack: Stack) -> None:
    body = {"jobs": [{"type": "demo.noop"}]}
    async with httpx.AsyncClient(base_url=module_stack.gateway_url) as anonymous:
        assert_problem(await anonymous.post("/v1/jobs/batch", json=body), 401)
    read_only = await run_cli(module_stack, "keys", "create", "--tenant", "tenant-a", "--scopes", "read")
    async with module_stack.client(read_only) as client:
        assert_problem(await client.post("/v1/jobs/batch", json=body), 403)


async def test_the_batch_operation_is_documented(module_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=module_stack.gateway_url) as client:
        schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"]["/v1/jobs/batch"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["jobs"]["maxItems"] == BATCH_LIMIT
    assert "idempotency_key" in body["properties"]["jobs"]["items"]["properties"]
    assert {"202", "401", "403", "413", "422", "429", "503"} <= set(operation["responses"])
