"""The job resources: submission options, idempotency, the status monitor (`?wait=`), result, cancel,
the list, per-tenant limits, and tenant isolation on every endpoint."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from conveyor.schemas import SUBMISSION_EXAMPLES
from services.gateway.listing import MAX_FILTER_VALUES

from harness import (
    KEY_A,
    KEY_B,
    Stack,
    assert_problem,
    eventually,
    nothing_waiting,
    run_cli,
    submit,
    submit_response,
    wait_for_status,
)

TERMINAL = {"succeeded", "failed", "canceled"}


async def test_submission_answers_202_with_location_retry_after_and_links(module_stack: Stack) -> None:
    # The "urgent" example of the OpenAPI document, as a reader of the docs would send it.
    body = SUBMISSION_EXAMPLES["urgent"]["value"]
    async with module_stack.client() as client:
        response = await submit_response(client, body)
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert int(response.headers["retry-after"]) >= 1
        assert job["status"] == "queued"
        assert (job["priority"], job["timeout_s"], job["max_attempts"]) == (1, 60, 5)
        assert job["labels"] == {"customer": "acme", "batch": "2026-11"}
        links = job["links"]
        assert links["self"] == response.headers["location"]
        assert links["cancel"] == f"{links['self']}/cancel"
        assert links["events"] == f"{module_stack.progress_url}{links['self']}/events"
        assert links["result"] is None

        done = await wait_for_status(client, job["id"], TERMINAL, 60)
        assert done["status"] == "succeeded"
        assert done["links"]["cancel"] is None
        assert done["links"]["result"] == f"{links['self']}/result"
        assert (await client.get(done["links"]["result"])).json() == {"invoice": 1042}


async def test_a_delayed_job_is_scheduled_then_runs(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        response = await submit_response(client, {"type": "demo.echo", "payload": 2, "delay_s": 2})
        job = response.json()
        assert job["status"] == "scheduled"
        assert job["run_at"] is not None
        assert int(response.headers["retry-after"]) in (1, 2)
        done = await wait_for_status(client, job["id"], TERMINAL, 60)
    assert done["status"] == "succeeded"
    assert datetime.fromisoformat(done["started_at"]) >= datetime.fromisoformat(job["run_at"])


async def test_schedule_and_option_errors_name_the_field(module_stack: Stack) -> None:
    now = datetime.now(UTC)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"run_at": (now + timedelta(minutes=1)).isoformat(), "delay_s": 5}, "delay_s"),
        ({"run_at": "2030-01-01T09:00:00"}, "run_at"),  # no UTC offset
        ({"run_at": (now + timedelta(days=400)).isoformat()}, "run_at"),
        ({"run_at": "tomorrow"}, "run_at"),
        ({"delay_s": -1}, "delay_s"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"labels": {"bad key!": "x"}}, "labels.bad key!.[key]"),
        ({"labels": {"k": 1}}, "labels.k"),
        ({"labels": {f"k{n}": "v" for n in range(17)}}, "labels"),
        ({"max_attempts": 0}, "max_attempts"),
    ]
    async with module_stack.client() as client:
        for extra, field in cases:
            problem = assert_problem(await client.post("/v1/jobs", json={"type": "demo.noop", **extra}), 422)
            fields = [error["field"] for error in problem["errors"]]  # type: ignore[attr-defined]
            assert fields == [field], (extra, problem)


async def test_a_past_run_at_runs_at_once(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        job = await submit(client, {"type": "demo.echo", "payload": 3, "run_at": past})
        assert job["status"] == "queued"
        assert (await wait_for_status(client, job["id"], TERMINAL, 60))["status"] == "succeeded"


async def test_the_same_idempotency_key_and_body_return_the_same_job(module_stack: Stack) -> None:
    key = str(uuid.uuid4())
    body = {"type": "demo.echo", "payload": {"a": 1, "b": 2}}
    async with module_stack.client() as client, module_stack.client(KEY_B) as other:
        first = await submit_response(client, body, **{"Idempotency-Key": key})
        # The same JSON with its keys in another order is the same request.
        again = await client.post(
            "/v1/jobs",
            content=json.dumps({"payload": {"b": 2, "a": 1}, "type": "demo.echo"}),
            headers={"Content-Type": "application/json", "Idempotency-Key": f'"{key}"'},
        )
        assert again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers

        changed = await client.post(
            "/v1/jobs", json={**body, "priority": 1}, headers={"Idempotency-Key": key}
        )
        problem = assert_problem(changed, 422)
        assert problem["errors"] == [
            {"field": "Idempotency-Key", "message": "already used with a different body"}
        ]

        # Keys are the tenant's own: another tenant's same key is another job.
        theirs = await submit_response(other, body, **{"Idempotency-Key": key})
        assert theirs.json()["id"] != first.json()["id"]

        listed = (
            await client.get("/v1/jobs", params={"label": [], "type": "demo.echo", "limit": 200})
        ).json()
        assert sum(item["id"] == first.json()["id"] for item in listed["items"]) == 1

        for bad in (b"", b"x" * 256, "caf\u00e9".encode()):
            response = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": bad})
            assert response.status_code in (400, 422), response.text


async def test_concurrent_identical_idempotent_requests_create_one_job(module_stack: Stack) -> None:
    key = str(uuid.uuid4())
    body = {"type": "demo.echo", "payload": {"concurrent": True}, "labels": {"race": key[:8]}}
    async with module_stack.client() as client:
        responses = await asyncio.gather(
            *(client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key}) for _ in range(12))
        )
        assert {response.status_code for response in responses} == {202}
        assert len({response.json()["id"] for response in responses}) == 1
        assert sum("idempotent-replayed" not in response.headers for response in responses) == 1
        listed = (await client.get("/v1/jobs", params={"label": f"race={key[:8]}"})).json()
    assert len(listed["items"]) == 1


async def test_wait_holds_the_request_until_the_job_changes_state(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        job = await submit(client, {"type": "demo.echo", "payload": 4, "delay_s": 1.5})
        loop = asyncio.get_running_loop()
        started = loop.time()
        changed = (await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})).json()
        waited = loop.time() - started
        assert changed["status"] != "scheduled"
        assert 0.5 < waited < 20, waited

        # A job that does not change within the wait is returned as it is, after the wait.
        later = await submit(client, {"type": "demo.noop", "delay_s": 120})
        started = loop.time()
        same = await client.get(f"/v1/jobs/{later['id']}", params={"wait": 1})
        assert same.json()["status"] == "scheduled"
        assert loop.time() - started >= 0.9
        assert same.headers["retry-after"]

        done = await wait_for_status(client, job["id"], TERMINAL, 60)
        started = loop.time()
        assert (await client.get(f"/v1/jobs/{job['id']}", params={"wait": 30})).json() == done
        assert loop.time() - started < 5, "a finished job is answered at once"
        assert_problem(await client.get(f"/v1/jobs/{job['id']}", params={"wait": 61}), 422)


async def test_result_before_the_end_and_of_a_failed_job_is_a_clear_problem(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        waiting = await submit(client, {"type": "demo.noop", "delay_s": 120})
        not_ready = assert_problem(await client.get(f"/v1/jobs/{waiting['id']}/result"), 409)
        assert not_ready["job_status"] == "scheduled"

        failing = await submit(client, {"type": "demo.fail", "payload": {"fail_times": 5}, "max_attempts": 1})
        await wait_for_status(client, failing["id"], TERMINAL, 60)
        failed = assert_problem(await client.get(f"/v1/jobs/{failing['id']}/result"), 409)
        assert failed["error"]["type"] == "DemoFailure"  # type: ignore[index]


async def test_cancel_a_scheduled_job_and_refuse_to_cancel_a_finished_one(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        job = await submit(client, {"type": "demo.echo", "payload": 5, "delay_s": 2})
        response = await client.post(job["links"]["cancel"])
        assert response.status_code == 202
        assert response.json()["status"] == "canceled"
        assert response.headers["location"] == job["links"]["self"]

        again = assert_problem(await client.post(job["links"]["cancel"]), 409)
        assert again["job_status"] == "canceled"
        canceled = assert_problem(await client.get(f"/v1/jobs/{job['id']}/result"), 409)
        assert canceled["title"] == "Job canceled"

        # Past its run_at, the job still never ran.
        await eventually(
            lambda: _past(job["run_at"], seconds=2), 10, "the canceled job's run_at plus the scheduler's tick"
        )
        final = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert (final["status"], final["attempts"], final["started_at"]) == ("canceled", 0, None)

        done = await submit(client, {"type": "demo.echo", "payload": 6})
        await wait_for_status(client, done["id"], TERMINAL, 60)
        finished = assert_problem(await client.post(f"/v1/jobs/{done['id']}/cancel"), 409)
        assert finished["job_status"] == "succeeded"


def _past(moment: str, seconds: float) -> bool:
    return datetime.now(UTC) > datetime.fromisoformat(moment) + timedelta(seconds=seconds)


async def test_list_filters_and_pages_newest_first(module_stack: Stack) -> None:
    batch = uuid.uuid4().hex[:8]
    async with module_stack.client() as client:
        created = []
        for n in range(7):
            body = {
                "type": "demo.echo" if n % 2 else "demo.noop",
                "payload": n,
                "priority": 1 + n % 5,
                "labels": {"batch": batch, "parity": "odd" if n % 2 else "even"},
                "delay_s": 300,  # they stay scheduled, so the status filter is deterministic
            }
            created.append(await submit(client, body))
        newest_first = [job["id"] for job in reversed(created)]

        pages: list[str] = []
        url = client.build_request("GET", "/v1/jobs", params={"label": f"batch={batch}", "limit": 3}).url
        while True:
            page = (await client.get(url)).json()
            pages.extend(item["id"] for item in page["items"])
            if page["next_cursor"] is None:
                assert page["next"] is None
                break
            assert len(page["items"]) == 3
            url = page["next"]
        assert pages == newest_first

        odd = (await client.get("/v1/jobs", params={"label": [f"batch={batch}", "parity=odd"]})).json()
        assert [item["id"] for item in odd["items"]] == [
            job["id"] for job in reversed(created) if job["labels"]["parity"] == "odd"
        ]
        by_type = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "type": "demo.noop"})
        ).json()
        assert {item["type"] for item in by_type["items"]} == {"demo.noop"}
        assert len(by_type["items"]) == 4
        by_priority = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "priority": [1, 2]})
        ).json()
        assert sorted(item["priority"] for item in by_priority["items"]) == [1, 1, 2, 2]
        by_status = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "status": ["queued", "running"]})
        ).json()
        assert by_status["items"] == []
        scheduled = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "status": "scheduled"})
        ).json()
        assert len(scheduled["items"]) == 7

        middle = created[3]["created_at"]
        after = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "created_after": middle})
        ).json()
        assert [item["id"] for item in after["items"]] == newest_first[:4]
        before = (
            await client.get("/v1/jobs", params={"label": f"batch={batch}", "created_before": middle})
        ).json()
        assert [item["id"] for item in before["items"]] == newest_first[4:]

        for params in (
            {"cursor": "not-a-cursor"},
            {"status": "sleeping"},
            {"priority": 9},
            {"limit": 0},
            {"limit": 201},
            {"label": "no-equals-sign"},
            {"created_after": "yesterday"},
            {"created_before": "2026-01-01T00:00:00"},
        ):
            assert_problem(await client.get("/v1/jobs", params=params), 422)
        # Each filter parameter takes at most MAX_FILTER_VALUES values; the 422 names the parameter.
        assert (await client.get("/v1/jobs", params={"type": ["t"] * MAX_FILTER_VALUES})).status_code == 200
        for name, value in (("label", "k=v"), ("type", "demo.echo"), ("status", "queued"), ("priority", "1")):
            refused = await client.get("/v1/jobs", params={name: [value] * (MAX_FILTER_VALUES + 1)})
            body = assert_problem(refused, 422)
            assert body["errors"] == [{"field": name, "message": body["errors"][0]["message"]}]  # type: ignore[index]
        for job in created:
            await client.post(job["links"]["cancel"])


async def test_a_tenant_never_sees_or_touches_another_tenants_job(module_stack: Stack) -> None:
    async with module_stack.client() as owner, module_stack.client(KEY_B) as other:
        job = await submit(owner, {"type": "demo.echo", "payload": {"secret": 1}, "delay_s": 60})
        missing = "00000000-0000-0000-0000-000000000000"
        for method, path in (
            ("GET", "/v1/jobs/{}"),
            ("GET", "/v1/jobs/{}?wait=1"),
            ("GET", "/v1/jobs/{}/result"),
            ("POST", "/v1/jobs/{}/cancel"),
        ):
            hidden = assert_problem(await other.request(method, path.format(job["id"])), 404)
            absent = assert_problem(await other.request(method, path.format(missing)), 404)
            assert hidden["title"] == absent["title"]
            assert hidden["type"] == absent["type"] == "urn:conveyor:problem:job-not-found"
        listed = (await other.get("/v1/jobs", params={"limit": 200})).json()
        assert job["id"] not in {item["id"] for item in listed["items"]}
        assert (await owner.get(f"/v1/jobs/{job['id']}")).json()["status"] == "scheduled"
        assert (await owner.post(job["links"]["cancel"])).status_code == 202


async def test_scopes_guard_every_endpoint(module_stack: Stack) -> None:
    reader = await run_cli(module_stack, "keys", "create", "--tenant", "tenant-a", "--scopes", "read")
    submitter = await run_cli(module_stack, "keys", "create", "--tenant", "tenant-a", "--scopes", "submit")
    async with module_stack.client() as full, module_stack.client(reader) as read_only:
        job = await submit(full, {"type": "demo.noop", "delay_s": 60})
        assert_problem(await read_only.post("/v1/jobs", json={"type": "demo.noop"}), 403)
        assert_problem(await read_only.post(job["links"]["cancel"]), 403)
        assert (await read_only.get("/v1/jobs")).status_code == 200
    async with module_stack.client(submitter) as submit_only:
        assert_problem(await submit_only.get(f"/v1/jobs/{job['id']}"), 403)
        assert_problem(await submit_only.get("/v1/jobs"), 403)
        assert_problem(await submit_only.get(f"/v1/jobs/{job['id']}/result"), 403)
        assert_problem(await submit_only.post(job["links"]["cancel"]), 403)


async def test_tenant_limits_answer_429_with_retry_after(module_stack: Stack) -> None:
    limits = {"tenant-a": {"submit_rate": 0.5, "submit_burst": 3}, "tenant-b": {"max_queued": 2}}
    base = module_stack.start_gateway("gateway-limited", CONVEYOR_TENANT_LIMITS=json.dumps(limits))
    try:
        await module_stack.wait_ready(base)
        async with (
            module_stack.client(KEY_A, base_url=base) as a,
            module_stack.client(KEY_B, base_url=base) as b,
        ):
            statuses = [(await a.post("/v1/jobs", json={"type": "demo.noop"})).status_code for _ in range(4)]
            assert statuses == [202, 202, 202, 429]
            limited = assert_problem(await a.post("/v1/jobs", json={"type": "demo.noop"}), 429)
            assert limited["limit"] == "rate"
            too_fast = await a.post("/v1/jobs", json={"type": "demo.noop"})
            assert 1 <= int(too_fast.headers["retry-after"]) <= 2

            # tenant-b may have two jobs waiting; a third is refused until one leaves the queue.
            await eventually(lambda: nothing_waiting(b), 60, "tenant-b's earlier jobs to leave the queue")
            waiting = [
                (await b.post("/v1/jobs", json={"type": "demo.noop", "delay_s": 300})).json()
                for _ in range(2)
            ]
            full = assert_problem(await b.post("/v1/jobs", json={"type": "demo.noop"}), 429)
            assert full["limit"] == "max_queued"
            assert (await b.post("/v1/jobs", json={"type": "demo.noop"})).headers["retry-after"]
            await b.post(waiting[0]["links"]["cancel"])
            assert (await b.post("/v1/jobs", json={"type": "demo.noop", "delay_s": 300})).status_code == 202
            for job in (await b.get("/v1/jobs", params={"status": "scheduled"})).json()["items"]:
                await b.post(job["links"]["cancel"])
    finally:
        module_stack.stop("gateway-limited")


async def test_openapi_documents_every_operation_with_examples(module_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=module_stack.gateway_url) as client:
        schema = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    operations = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("GET", "/v1/jobs/{job_id}/result"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("GET", "/v1/job-types"),
    } <= operations
    submit_op = schema["paths"]["/v1/jobs"]["post"]
    assert {"simple", "urgent", "delayed", "scheduled"} <= set(
        submit_op["requestBody"]["content"]["application/json"]["examples"]
    )
    accepted = submit_op["responses"]["202"]
    assert accepted["content"]["application/json"]["example"]["links"]["cancel"]
    assert {"Location", "Retry-After"} <= set(accepted["headers"])
    assert {"400", "401", "403", "413", "415", "422", "429", "503"} <= set(submit_op["responses"])
    assert [p["name"] for p in submit_op["parameters"]] == ["Idempotency-Key"]
