"""The `conveyor` command as a client, through real subprocesses against a real stack: exit codes,
`--json` output, tables, `watch` drawn to a captured console, `top` for one refresh."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from pathlib import Path

from rich.console import Console

from conveyor.client import AsyncClient, Client, JobStatus, display

from harness import KEY_A, Stack, cli, eventually

WITHIN_S = 60


def as_client(stack: Stack, key: str = KEY_A) -> dict[str, str]:
    return {"CONVEYOR_URL": stack.gateway_url, "CONVEYOR_API_KEY": key}


async def conveyor(stack: Stack, *args: str, key: str = KEY_A) -> tuple[int | None, str, str]:
    return await cli(stack, *args, env=as_client(stack, key))


async def test_submit_json_then_status_json(module_stack: Stack) -> None:
    code, out, err = await conveyor(
        module_stack, "submit", "demo.echo", "--payload", '{"n": 1}', "--label", "via=cli", "--json"
    )
    assert code == 0, err
    job = json.loads(out)  # one JSON object and nothing else
    assert (job["type"], job["labels"]) == ("demo.echo", {"via": "cli"})
    async with AsyncClient(module_stack.gateway_url, api_key=KEY_A) as client:
        await client.wait(job["id"], timeout=WITHIN_S)
    code, out, err = await conveyor(module_stack, "status", job["id"], "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["id"], shown["status"], shown["result"]) == (job["id"], "succeeded", {"n": 1})
    code, out, _ = await conveyor(module_stack, "status", job["id"])
    assert code == 0 and job["id"] in out and "succeeded" in out and '{"n": 1}' in out


async def test_wait_exits_with_the_jobs_outcome(module_stack: Stack, tmp_path: Path) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text('{"hello": "file"}')
    code, out, err = await conveyor(
        module_stack, "submit", "demo.echo", "--payload", f"@{payload}", "--wait", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["result"] == {"hello": "file"}

    code, out, err = await conveyor(
        module_stack, "submit", "demo.fail", "--payload", '{"fail_times": 100}', "--wait", "--json"
    )
    assert code == 1, err
    failed = json.loads(out)
    assert failed["status"] == "failed" and failed["error"]["type"] == "DemoFailure"

    code, out, err = await conveyor(module_stack, "retry", failed["id"], "--attempts", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["status"] == "queued"


async def test_payload_from_stdin(module_stack: Stack) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "conveyor", "submit", "demo.echo", "--payload", "-", "--wait", "--json"),
        env={**os.environ, **module_stack.env, **as_client(module_stack)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(b'["from", "stdin"]')
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["result"] == ["from", "stdin"]


async def test_watch_exits_2_when_the_job_is_canceled(module_stack: Stack) -> None:
    async with AsyncClient(module_stack.gateway_url, api_key=KEY_A) as client:
        job = await client.submit("demo.sleep", {"seconds": 30, "steps": 30})
        watching = asyncio.create_task(conveyor(module_stack, "watch", job.id, "--json"))

        async def running() -> bool:
            return (await client.get(job.id)).progress.percent is not None

        await eventually(running, WITHIN_S, "the job to report progress")
        await client.cancel(job.id)
        code, out, err = await asyncio.wait_for(watching, WITHIN_S)
    assert code == 2, err
    assert json.loads(out)["status"] == "canceled"


async def test_submit_watch_exits_0_with_its_result(module_stack: Stack) -> None:
    code, out, err = await conveyor(
        module_stack, "submit", "demo.sleep", "--payload", '{"seconds": 1, "steps": 2}', "--watch", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["result"] == {"slept_s": 1.0, "steps": 2}


async def test_api_errors_print_the_problem_and_exit_1(module_stack: Stack) -> None:
    code, out, err = await conveyor(module_stack, "status", str(uuid.uuid4()))
    assert (code, out) == (1, "")
    assert "not found" in err.lower()
    code, _, err = await conveyor(module_stack, "submit", "no.such.type")
    assert code == 1 and "unknown job type" in err and "demo.echo" in err
    code, _, err = await conveyor(module_stack, "ls", key="not-a-key-0123456789")
    assert code == 1 and "unauthorized" in err.lower()
    code, _, err = await conveyor(module_stack, "submit", "demo.echo", "--payload", "{not json")
    assert code == 2 and "not JSON" in err


async def test_ls_types_and_cancel(module_stack: Stack) -> None:
    tag = uuid.uuid4().hex
    async with AsyncClient(module_stack.gateway_url, api_key=KEY_A) as client:
        jobs = [await client.submit("demo.echo", n, labels={"tag": tag}, delay_s=3600) for n in range(3)]
    code, out, err = await conveyor(module_stack, "ls", "--label", f"tag={tag}", "--status", "scheduled")
    assert code == 0, err
    assert all(job.id in out for job in jobs) and "scheduled" in out and "age" in out
    code, out, err = await conveyor(module_stack, "ls", "--label", f"tag={tag}", "--limit", "2", "--json")
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [jobs[2].id, jobs[1].id]
    code, out, err = await conveyor(module_stack, "cancel", jobs[0].id, "--json")
    assert code == 0 and json.loads(out)["status"] == "canceled", err
    code, _, err = await conveyor(module_stack, "cancel", jobs[0].id)
    assert code == 1 and "already finished" in err.lower()
    for job in jobs[1:]:
        await conveyor(module_stack, "cancel", job.id)
    code, out, err = await conveyor(module_stack, "types")
    assert code == 0 and "demo.sleep" in out and "demo.echo" in out, err


async def test_top_shows_one_refresh_of_the_queue(module_stack: Stack) -> None:
    async with AsyncClient(module_stack.gateway_url, api_key=KEY_A) as client:
        later = await client.submit("demo.echo", "top", priority=5, delay_s=3600)
        stats = await client.stats()
        code, out, err = await conveyor(module_stack, "top", "--once")
        await client.cancel(later.id)
    assert code == 0, err
    assert "p1" in out and "p5" in out and "scheduled" in out
    assert "finished in the last minute" in out and "oldest waiting job" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("p5"))
    assert row.split()[1] == str(stats.priorities[5].scheduled)


async def test_watch_draws_the_progress_bar_to_a_console(module_stack: Stack) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, record=True)

    def watch() -> JobStatus:
        with Client(module_stack.gateway_url, api_key=KEY_A) as client:
            job = client.submit("demo.sleep", {"seconds": 1, "steps": 4})
            return display.watch(client, job, console).status

    assert await asyncio.to_thread(watch) is JobStatus.SUCCEEDED
    drawn = console.export_text()
    assert "succeeded" in drawn and "100%" in drawn and "step 4 of 4" in drawn
    assert "━" in drawn  # the bar itself


async def test_the_example_application_runs(module_stack: Stack) -> None:
    example = Path(__file__).parent.parent / "examples" / "progress_app.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        env={**os.environ, **as_client(module_stack)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), WITHIN_S)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert "chase: succeeded {'slept_s': 4.0, 'steps': 4}" in lines
    assert any(line.split()[:2] == ["chase", "50%"] for line in lines), lines
