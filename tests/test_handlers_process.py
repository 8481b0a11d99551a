"""Process-pool handlers (`@job(..., process=True)`): first in this process with real child processes,
then through a whole stack on real Kafka and both databases.

The handlers the children run are in tests/process_handlers.py: a child imports them by name.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import process_handlers
import pytest

from conveyor import processes
from conveyor.handlers import Handler, JobContext, JobType, job, run_handler
from conveyor.processes import ProcessHandlerError, ProcessPool

from harness import Stack, collect_events, eventually, submit, wait_for_status, worker_events

# Starting a child (spawn: a fresh interpreter importing conveyor) takes about a second on a slow machine.
RUN_TIMEOUT_S = 30.0
# A child checks `ctx.cancelled` at most every CANCEL_CHECK_INTERVAL_S, then its function returns.
CANCEL_SEEN_WITHIN_S = 1.0
JOB_TIMEOUT_S = 60
TERMINAL = {"succeeded", "failed", "canceled"}
PRIMES_BELOW_200K = 17_984

Reported = tuple[float | None, str | None]


class Reports:
    """A job's progress reporter that keeps what it is told, as the worker's would write it."""

    def __init__(self) -> None:
        self.received: list[Reported] = []

    async def __call__(self, percent: float | None, message: str | None) -> None:
        self.received.append((percent, message))


def new_context(reports: Reports, job_id: str = "job-1") -> JobContext:
    return JobContext(job_id=job_id, tenant="tenant-a", type="test.process", attempt=2, report=reports)


def process_type(handler: Handler) -> JobType:
    return JobType(f"test.{handler.__name__}", handler, process=True)


async def started_pid(reports: Reports) -> int:
    """The pid a waiting handler reports as soon as it runs."""
    first: Reported = await eventually(
        lambda: reports.received[:1] and reports.received[0], RUN_TIMEOUT_S, "the child to start"
    )
    assert first[1] is not None
    return int(first[1])


def pid_alive(pid: int) -> bool:
    """Running, rather than gone or a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module", autouse=True)
def default_pool() -> Iterator[None]:
    """The pool `run_handler` uses, stopped when this module's tests are done."""
    yield
    processes.shutdown()


async def test_a_process_handler_runs_in_another_process_with_the_jobs_context() -> None:
    result = await asyncio.wait_for(
        run_handler(process_type(process_handlers.whoami), new_context(Reports()), {"n": [1, 2]}),
        RUN_TIMEOUT_S,
    )

    assert result["pid"] != os.getpid()
    assert result == {
        "pid": result["pid"],
        "job_id": "job-1",
        "tenant": "tenant-a",
        "type": "test.process",
        "attempt": 2,
        "payload": {"n": [1, 2]},
    }


async def test_progress_reaches_the_parent_in_order_before_the_result() -> None:
    reports = Reports()
    job_type = process_type(process_handlers.count)

    result = await asyncio.wait_for(
        run_handler(job_type, new_context(reports), process_handlers.Steps(steps=4)), RUN_TIMEOUT_S
    )

    assert result == {"steps": 4}, "a model result comes back as its JSON form"
    assert reports.received == [(25.0, "step 1"), (50.0, "step 2"), (75.0, "step 3"), (100.0, "step 4")]


async def test_an_exception_in_the_child_fails_the_attempt_with_the_childs_traceback() -> None:
    with pytest.raises(ValueError, match="failing on purpose") as raised:
        await asyncio.wait_for(
            run_handler(process_type(process_handlers.fail), new_context(Reports()), None), RUN_TIMEOUT_S
        )

    # What the worker keeps as the error's traceback shows where in the child it was raised.
    text = "".join(traceback.format_exception(raised.value))
    assert 'process_handlers.py", line' in text
    assert "in fail" in text
    assert f"failing on purpose in {os.getpid()}" not in text


async def test_an_exception_that_cannot_come_back_is_replaced_and_the_pool_lives_on() -> None:
    job_type = process_type(process_handlers.fail_unpicklable)
    with pytest.raises(ProcessHandlerError, match="Unpicklable: no way back: two arguments") as raised:
        await asyncio.wait_for(run_handler(job_type, new_context(Reports()), None), RUN_TIMEOUT_S)
    assert "in fail_unpicklable" in "".join(traceback.format_exception(raised.value))

    after = process_type(process_handlers.whoami)
    assert (await asyncio.wait_for(run_handler(after, new_context(Reports()), None), RUN_TIMEOUT_S))["pid"]


async def test_a_child_that_dies_fails_its_attempt_and_the_next_job_gets_a_new_pool() -> None:
    with pytest.raises(BrokenProcessPool):
        await asyncio.wait_for(
            run_handler(process_type(process_handlers.exit_abruptly), new_context(Reports()), None),
            RUN_TIMEOUT_S,
        )

    after = process_type(process_handlers.whoami)
    assert (await asyncio.wait_for(run_handler(after, new_context(Reports()), None), RUN_TIMEOUT_S))["pid"]


async def test_the_child_sees_ctx_cancelled_soon_after_it_is_set() -> None:
    reports = Reports()
    ctx = new_context(reports)
    handler = asyncio.create_task(run_handler(process_type(process_handlers.wait_for_cancel), ctx, None))
    await started_pid(reports)
    loop = asyncio.get_running_loop()

    set_at = loop.time()
    ctx.cancelled.set()
    result = await asyncio.wait_for(handler, RUN_TIMEOUT_S)

    assert result == {"cancelled": True}
    assert loop.time() - set_at < CANCEL_SEEN_WITHIN_S


async def test_an_interrupted_wait_ends_at_once_and_tells_the_child_to_stop(tmp_path: Path) -> None:
    marker = tmp_path / "saw-cancel"
    reports = Reports()
    job_type = process_type(process_handlers.wait_for_cancel)
    handler = asyncio.create_task(
        run_handler(job_type, new_context(reports), process_handlers.Marker(path=str(marker)))
    )
    pid = await started_pid(reports)
    loop = asyncio.get_running_loop()

    # As the executor interrupts a handler past its grace or timeout; `ctx.cancelled` was never set.
    interrupted_at = loop.time()
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert loop.time() - interrupted_at < CANCEL_SEEN_WITHIN_S, "the wait ends without the child"

    await eventually(marker.exists, CANCEL_SEEN_WITHIN_S + 1, "the child to see the cancel")
    assert marker.read_text() == str(pid)


async def test_shutdown_terminates_a_child_that_ignores_the_cancel_and_the_pool_starts_again() -> None:
    pool = ProcessPool(1)
    reports = Reports()
    handler = asyncio.create_task(
        pool.run(process_type(process_handlers.ignore_cancel), new_context(reports), None)
    )
    pid = await started_pid(reports)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler

    await asyncio.to_thread(pool.shutdown, 0.5)

    await eventually(lambda: not pid_alive(pid), RUN_TIMEOUT_S, f"child {pid} to be gone")
    try:
        again = await asyncio.wait_for(
            pool.run(process_type(process_handlers.whoami), new_context(Reports()), None), RUN_TIMEOUT_S
        )
        assert again["pid"] != pid
    finally:
        await asyncio.to_thread(pool.shutdown)


# A worker with a busy child, killed without a chance to stop it: the child must not run on as an orphan.
KILLED_WORKER = """
import asyncio, sys
import process_handlers
from conveyor.handlers import JobContext, JobType
from conveyor.processes import ProcessPool

async def report(percent, message):
    print("child", message, flush=True)

async def main():
    ctx = JobContext(job_id="j", tenant="t", type="test.ignore_cancel", attempt=1, report=report)
    await ProcessPool(1).run(JobType("test.ignore_cancel", process_handlers.ignore_cancel), ctx, None)

if __name__ == "__main__":
    asyncio.run(main())
"""


async def reported_pid(output: asyncio.StreamReader) -> int:
    """The pid in the first `child <pid>` line (the others are the pool's log)."""
    while not (line := await output.readline()).startswith(b"child "):
        assert line, "the worker exited"
    return int(line.split()[1])


async def test_children_exit_soon_after_their_worker_is_killed() -> None:
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WORKER,
        cwd=Path(__file__).parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None
        child = await asyncio.wait_for(reported_pid(worker.stdout), RUN_TIMEOUT_S)
        assert pid_alive(child)
    finally:
        worker.send_signal(signal.SIGKILL)
        await worker.wait()

    orphan_exit_s = processes.PARENT_CHECK_INTERVAL_S + 5
    await eventually(lambda: not pid_alive(child), orphan_exit_s, f"the orphan {child} to exit")


def test_a_process_handlers_progress_takes_what_an_async_handlers_does() -> None:
    # The two contexts' `progress` are one method in two forms (awaited, and a plain call in a child):
    # a handler moved between them keeps its calls, so their parameters must stay the same.
    async_form = inspect.signature(JobContext.progress).parameters
    process_form = inspect.signature(processes.ProcessJobContext.progress).parameters
    assert list(process_form.values()) == list(async_form.values())


def test_a_process_handler_must_be_a_plain_module_level_function() -> None:
    async def not_plain(ctx: Any, payload: Any) -> None:
        pass

    def nested(ctx: Any, payload: Any) -> None:
        pass

    with pytest.raises(TypeError, match="plain function"):
        job("test.async_in_process", process=True)(not_plain)
    with pytest.raises(TypeError, match="top level"):
        job("test.nested_in_process", process=True)(nested)


# Through a stack: the worker's own pool, its reports in the database and on the events socket.


pytestmark = pytest.mark.stack_settings(CONVEYOR_LOG_JSON="true", CONVEYOR_WORKER_PROCESSES=2)


async def test_a_crunch_job_runs_in_the_workers_pool_from_202_to_succeeded(stack: Stack) -> None:
    async with stack.client() as client:
        body = {"type": "demo.crunch", "payload": {"n": 200_000, "steps": 4}}
        job_id = (await submit(client, body))["id"]

        messages, _ = await asyncio.wait_for(collect_events(stack, job_id), JOB_TIMEOUT_S)
        final = await wait_for_status(client, job_id, TERMINAL, JOB_TIMEOUT_S)

    assert final["status"] == "succeeded", final["error"]
    assert final["result"] == {"n": 200_000, "primes": PRIMES_BELOW_200K}
    assert final["attempts"] == 1
    assert final["progress"] == {"percent": 100.0, "message": "step 4 of 4"}
    snapshot, events = messages[0], messages[1:]
    progress = [event["progress"]["percent"] for event in events if event["type"] == "progress"]
    assert progress == sorted(progress)
    assert progress[-1] == 100.0
    assert len(progress) == 4 or snapshot["job"]["progress"]["percent"] is not None
    assert events[-1]["type"] == "state"
    assert events[-1]["status"] == "succeeded", "the last report is written before the outcome"
    # The child logs to the worker's log, bound to the job, from a process of its own.
    (crunched,) = worker_events(stack, "demo.crunched", job_id)
    assert crunched["primes"] == PRIMES_BELOW_200K
    assert crunched["pid"] != stack.processes["worker-1"].pid


async def test_a_canceled_crunch_job_stops_its_child_within_the_grace(stack: Stack) -> None:
    async with stack.client() as client:
        body = {"type": "demo.crunch", "payload": {"n": 100_000_000, "steps": 1000}}
        job_id = (await submit(client, body))["id"]

        async def crunching() -> bool:
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            return bool(job["progress"]["percent"])

        await eventually(crunching, JOB_TIMEOUT_S, "the child's first report")
        response = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202, response.text

        (canceled,) = await eventually(
            lambda: worker_events(stack, "job.canceled", job_id), JOB_TIMEOUT_S, "the handler to stop"
        )
        final = (await client.get(f"/v1/jobs/{job_id}")).json()

    assert canceled["interrupted"] is False, "the child saw ctx.cancelled and raised within the grace"
    assert final["status"] == "canceled"
    assert final["result"] is None
    assert final["progress"]["percent"] < 100
