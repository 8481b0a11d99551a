"""The gateway's HTTP contract: authentication, problem details, tenant isolation, health."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from conveyor import health
from conveyor.auth import PRINCIPAL_CACHE_S, hash_key
from conveyor.database import Database
from conveyor.health import READINESS_CACHE_S
from conveyor.models import ApiKey
from conveyor.readiness import check_readiness
from conveyor.settings import Settings

from harness import (
    KEY_A,
    KEY_B,
    Stack,
    assert_problem,
    cli,
    counted_gateway,
    eventually,
    run_cli,
    selects,
    selects_since,
    wait_alive,
    wait_for_status,
)

UNAUTHORIZED: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-key"},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic a2V5LWEtMDEyMzQ1Njc4OQ=="},
]


async def test_requests_without_a_valid_key_get_401(module_stack: Stack) -> None:
    for headers in UNAUTHORIZED:
        async with httpx.AsyncClient(base_url=module_stack.gateway_url, headers=headers) as client:
            responses = [
                await client.post("/v1/jobs", json={"type": "demo.echo"}),
                await client.get("/v1/jobs/anything"),
                await client.get("/v1/job-types"),
            ]
        for response in responses:
            assert_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_client_errors_are_problem_details_naming_the_field(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        unknown = assert_problem(await client.post("/v1/jobs", json={"type": "no.such"}), 422)
        assert unknown["errors"] == [{"field": "type", "message": unknown["errors"][0]["message"]}]  # type: ignore[index]
        assert "demo.sleep" in unknown["known_types"]  # type: ignore[operator]

        payload = assert_problem(
            await client.post("/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": "soon"}}), 422
        )
        assert [e["field"] for e in payload["errors"]] == ["payload.seconds"]  # type: ignore[attr-defined]

        extra = assert_problem(
            await client.post("/v1/jobs", json={"type": "demo.sleep", "payload": {"minutes": 1}}), 422
        )
        assert [e["field"] for e in extra["errors"]] == ["payload.minutes"]  # type: ignore[attr-defined]

        priority = assert_problem(
            await client.post("/v1/jobs", json={"type": "demo.echo", "priority": 9}), 422
        )
        assert [e["field"] for e in priority["errors"]] == ["priority"]  # type: ignore[attr-defined]

        missing = assert_problem(await client.post("/v1/jobs", json={"payload": {}}), 422)
        assert [e["field"] for e in missing["errors"]] == ["type"]  # type: ignore[attr-defined]

        not_object = assert_problem(await client.post("/v1/jobs", json=[1, 2]), 422)
        assert not_object["errors"]

        malformed = await client.post(
            "/v1/jobs", content=b'{"type": ', headers={"Content-Type": "application/json"}
        )
        assert_problem(malformed, 400)

        not_json = await client.post(
            "/v1/jobs", content=b"type=demo.echo", headers={"Content-Type": "text/plain"}
        )
        assert_problem(not_json, 415)

        big = await client.post(
            "/v1/jobs",
            content=b'{"type": "demo.echo", "payload": "' + b"x" * (1024 * 1024) + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert_problem(big, 413)

        assert_problem(await client.get("/v1/nothing-here"), 404)
        assert_problem(await client.delete("/v1/jobs"), 405)


async def test_a_tenant_never_sees_another_tenants_job(module_stack: Stack) -> None:
    async with module_stack.client() as owner, module_stack.client(KEY_B) as other:
        job = (await owner.post("/v1/jobs", json={"type": "demo.echo", "payload": {"secret": 1}})).json()
        hidden = assert_problem(await other.get(f"/v1/jobs/{job['id']}"), 404)
        missing = assert_problem(await other.get("/v1/jobs/00000000-0000-0000-0000-000000000000"), 404)
        assert hidden["title"] == missing["title"]  # indistinguishable from a job that does not exist
        assert (await owner.get(f"/v1/jobs/{job['id']}")).status_code == 200


async def test_job_types_list_the_demo_types_with_their_schemas(module_stack: Stack) -> None:
    async with module_stack.client() as client:
        types = {t["name"]: t for t in (await client.get("/v1/job-types")).json()}
    assert {"demo.echo", "demo.sleep", "demo.fail", "demo.noop"} <= set(types)
    assert set(types["demo.sleep"]["payload_schema"]["properties"]) == {"seconds", "steps"}


async def test_health_and_readiness(module_stack: Stack) -> None:
    async with httpx.AsyncClient() as client:
        for base in (module_stack.gateway_url, module_stack.progress_url.replace("ws://", "http://")):
            assert (await client.get(f"{base}/healthz")).json() == {"status": "ok"}
            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready"}  # no details without a key
            detailed = await client.get(f"{base}/readyz", headers={"Authorization": f"Bearer {KEY_A}"})
            assert detailed.json()["checks"] == {"database": "ok", "kafka": "ok"}


async def test_readiness_fails_when_kafka_is_unreachable(module_stack: Stack) -> None:
    base = module_stack.start_gateway("gateway-no-kafka", CONVEYOR_KAFKA_BOOTSTRAP="127.0.0.1:1")
    await wait_alive(base, 60)
    async with httpx.AsyncClient(base_url=base) as client:
        ready = await client.get("/readyz")
        detailed = await client.get("/readyz", headers={"Authorization": f"Bearer {KEY_A}"})
        wrong_key = await client.get("/readyz", headers={"Authorization": "Bearer not-a-key"})
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready"}  # what is wrong is no business of anonymous callers
    assert wrong_key.json() == {"status": "not ready"}
    assert detailed.status_code == 503
    assert detailed.json()["checks"]["database"] == "ok"
    assert detailed.json()["checks"]["kafka"].startswith("unreachable")
    assert "readiness.not_ready" in module_stack.log("gateway-no-kafka")


async def test_readiness_is_worked_out_once_a_second_at_most(
    db: Database, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fresh answer opens a Kafka admin connection: a probe storm must not open one per request."""
    worked_out: list[float] = []

    async def counted(*args: str | Database) -> dict[str, str]:
        worked_out.append(time.monotonic())
        return await check_readiness(*args)  # type: ignore[arg-type]  # the real check, counted

    monkeypatch.setattr(health, "check_readiness", counted)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}")
    app = FastAPI()
    state = SimpleNamespace(db=db, settings=settings, authenticator=None)
    app.include_router(health.health_router(lambda _request: state))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        started = time.monotonic()
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(50)))
        answers += [await client.get("/readyz") for _ in range(50)]
        elapsed = time.monotonic() - started
        assert {answer.status_code for answer in answers} == {503}  # this prefix has no topics
        assert len(worked_out) <= elapsed / READINESS_CACHE_S + 1, (
            f"{len(worked_out)} checks in {elapsed:.1f}s"
        )

        async def worked_out_again() -> bool:
            await client.get("/readyz")
            return len(worked_out) > 1

        await eventually(worked_out_again, 5 * READINESS_CACHE_S, "a stale readiness answer to be renewed")


async def test_job_types_need_the_read_scope(module_stack: Stack) -> None:
    submit_only = await run_cli(module_stack, "keys", "create", "--tenant", "tenant-d", "--scopes", "submit")
    async with module_stack.client(submit_only) as client:
        body = assert_problem(await client.get("/v1/job-types"), 403)
    assert "read" in str(body["detail"])


async def test_keys_created_with_the_cli_authenticate_with_their_scopes(module_stack: Stack) -> None:
    create = ["keys", "create", "--tenant", "tenant-c"]
    reader_key = await run_cli(module_stack, *create, "--scopes", "read")
    full_key = await run_cli(module_stack, *create)
    async with module_stack.client(full_key) as client, module_stack.client(reader_key) as read_only:
        job = (await client.post("/v1/jobs", json={"type": "demo.echo", "payload": 1})).json()
        assert (await wait_for_status(client, job["id"], {"succeeded"}, 60))["result"] == 1
        assert (await read_only.get(f"/v1/jobs/{job['id']}")).status_code == 200
        assert_problem(await read_only.post("/v1/jobs", json={"type": "demo.echo"}), 403)


async def refused_within(client: httpx.AsyncClient, within_s: float) -> float:
    """Poll until the client's key is refused (401); how long it took. Fails after `within_s`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (response := await client.get("/v1/job-types")).status_code != 401:
        assert response.status_code == 200, response.text
        assert loop.time() - started < within_s, f"still accepted after {within_s} s"
        await asyncio.sleep(0.05)
    assert_problem(response, 401)
    return loop.time() - started


# A revoked key is refused once the gateway's memory of its lookup runs out (conveyor.auth), plus a
# request's time on a loaded machine.
REVOKED_WITHIN_S = PRINCIPAL_CACHE_S + 1.0


FLOOD_REQUESTS = 600
API_KEYS_TABLE = ApiKey.__tablename__
FLOOD_CONCURRENCY = 30


async def test_a_flood_of_bad_keys_gets_401_and_costs_a_query_a_second_at_most(
    module_stack: Stack, tmp_path: Path
) -> None:
    # Only the API keys' queries are counted: the gateway's other queries (its outbox relay's, say)
    # come and go with its own timers, and once took a flood's margin of a query or two.
    counted, stats_dir = await counted_gateway(module_stack, "gateway-auth-counted", tmp_path)
    started, before = time.monotonic(), selects(stats_dir, API_KEYS_TABLE)
    limit = asyncio.Semaphore(FLOOD_CONCURRENCY)
    async with httpx.AsyncClient(base_url=counted, timeout=30) as client:

        async def attempt(n: int) -> int:
            # Half of them the same wrong key, half each a key of their own.
            key = f"cvk_made-up-{n}" if n % 2 else "cvk_the-same-wrong-key"
            async with limit:
                response = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
            return response.status_code

        statuses = await asyncio.gather(*(attempt(n) for n in range(FLOOD_REQUESTS)))
    elapsed = time.monotonic() - started
    after = await selects_since(stats_dir, time.time(), API_KEYS_TABLE)
    assert set(statuses) == {401}
    # A first lookup at the start, and one each time the memory of the keys runs out meanwhile.
    allowed = elapsed / PRINCIPAL_CACHE_S + 2
    assert 1 <= after - before <= allowed, (
        f"{FLOOD_REQUESTS} bad keys cost {after - before} queries in {elapsed:.1f} s"
    )


async def test_keys_revoked_with_the_cli_get_401_within_a_second(module_stack: Stack) -> None:
    tenant = "tenant-revoked"
    created = [await cli(module_stack, "keys", "create", "--tenant", tenant) for _ in range(2)]
    assert [code for code, _, _ in created] == [0, 0]
    (_, by_id, id_line), (_, by_value, other_id_line) = created
    assert by_id.startswith("cvk_") and "\n" not in by_id  # the secret alone on stdout, as scripts expect
    key_id = re.fullmatch(r"key id (\d+)", id_line)
    other_id = re.fullmatch(r"key id (\d+)", other_id_line)
    assert key_id and other_id, (id_line, other_id_line)

    async with module_stack.client(by_id) as client, module_stack.client(by_value) as other:
        assert (await client.get("/v1/job-types")).status_code == 200
        assert (await other.get("/v1/job-types")).status_code == 200

        code, _, said = await cli(module_stack, "keys", "revoke", key_id[1])
        assert code == 0 and f"revoked key id {key_id[1]}" in said, said
        await refused_within(client, REVOKED_WITHIN_S)
        assert (await other.get("/v1/job-types")).status_code == 200

        code, _, said = await cli(module_stack, "keys", "revoke", "--key", by_value)
        assert code == 0 and f"revoked key id {other_id[1]}" in said, said
        await refused_within(other, REVOKED_WITHIN_S)

    code, _, said = await cli(module_stack, "keys", "revoke", key_id[1])
    assert code == 0 and "already revoked" in said, said
    for unknown in (["999999"], ["--key", "cvk_never-issued"], []):
        code, _, said = await cli(module_stack, "keys", "revoke", *unknown)
        assert code == 2 and said, unknown

    code, table, said = await cli(module_stack, "keys", "list", "--tenant", tenant, env={"COLUMNS": "200"})
    assert code == 0, said
    assert by_id not in table and by_value not in table and hash_key(by_id) not in table
    moment = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    for match in (key_id, other_id):
        assert re.search(rf"^\s*{match[1]}\s+{tenant}\s.*{moment}\s+{moment}\s*$", table, re.M), table
    code, table, _ = await cli(module_stack, "keys", "list", "--tenant", "tenant-with-no-keys")
    assert code == 0 and table == ""
