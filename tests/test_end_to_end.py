"""The whole path on real Kafka and a real database (SQLite and PostgreSQL): 202, worker, live events."""

from __future__ import annotations

from harness import Stack, collect_events, wait_for_status

JOB_TIMEOUT_S = 60


async def test_sleep_job_runs_from_202_to_succeeded_with_live_progress(stack: Stack) -> None:
    async with stack.client() as client:
        response = await client.post(
            "/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": 2, "steps": 4}}
        )

        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"
        assert int(response.headers["retry-after"]) >= 1
        assert job["status"] == "queued"
        assert job["type"] == "demo.sleep"
        assert job["priority"] == 3
        assert job["created_at"]
        assert job["links"]["self"] == f"/v1/jobs/{job['id']}"
        assert job["links"]["events"] == f"{stack.progress_url}/v1/jobs/{job['id']}/events"

        messages, close_code = await collect_events(stack, job["id"])

        assert close_code == 1000
        snapshot, events = messages[0], messages[1:]
        assert snapshot["type"] == "snapshot"
        assert snapshot["job"]["id"] == job["id"]
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(events))), (
            "gap-free, in order"
        )
        assert events[-1]["type"] == "state"
        assert events[-1]["status"] == "succeeded"
        assert events[-1]["result"] == {"slept_s": 2.0, "steps": 4}
        progress = [event["progress"]["percent"] for event in events if event["type"] == "progress"]
        assert progress == sorted(progress)
        assert progress[-1] == 100.0
        # All four progress reports arrive live unless the job had progressed before the socket opened.
        assert len(progress) == 4 or snapshot["job"]["progress"]["percent"] is not None

        final = (await client.get(job["links"]["self"])).json()
        assert final["status"] == "succeeded"
        assert final["result"] == {"slept_s": 2.0, "steps": 4}
        assert final["attempts"] == 1
        assert final["progress"] == {"percent": 100.0, "message": "step 4 of 4"}
        assert final["started_at"] and final["finished_at"]


async def test_echo_result_is_the_payload(stack: Stack) -> None:
    payload = {"text": "hello", "n": [1, 2, 3], "nested": {"ok": True}}
    async with stack.client() as client:
        job = (await client.post("/v1/jobs", json={"type": "demo.echo", "payload": payload})).json()
        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
    assert final["status"] == "succeeded"
    assert final["result"] == payload


async def test_failing_job_is_retried_until_it_succeeds(stack: Stack) -> None:
    async with stack.client() as client:
        job = (await client.post("/v1/jobs", json={"type": "demo.fail", "payload": {"fail_times": 2}})).json()
        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
    assert final["status"] == "succeeded"
    assert final["attempts"] == 3
    assert final["result"] == {"attempts": 3}


async def test_job_that_keeps_failing_ends_failed_with_its_error(stack: Stack) -> None:
    async with stack.client() as client:
        job = (
            await client.post(
                "/v1/jobs", json={"type": "demo.fail", "payload": {"fail_times": 9}, "max_attempts": 2}
            )
        ).json()
        final = await wait_for_status(client, job["id"], {"succeeded", "failed"}, JOB_TIMEOUT_S)
        response = await client.get(f"/v1/jobs/{job['id']}")
    assert final["status"] == "failed"
    assert final["attempts"] == 2
    assert final["error"]["type"] == "DemoFailure"
    assert "attempt 2" in final["error"]["message"]
    assert "retry-after" not in response.headers  # terminal: nothing more to wait for


async def test_events_of_a_finished_job_are_its_snapshot_then_close(stack: Stack) -> None:
    async with stack.client() as client:
        job = (await client.post("/v1/jobs", json={"type": "demo.noop"})).json()
        await wait_for_status(client, job["id"], {"succeeded"}, JOB_TIMEOUT_S)
    messages, close_code = await collect_events(stack, job["id"])
    assert close_code == 1000
    assert [m["type"] for m in messages] == ["snapshot"]
    assert messages[0]["job"]["status"] == "succeeded"
