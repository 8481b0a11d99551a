"""The time limit: which limit an attempt has, and how an attempt past it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.changes import TIMED_OUT
from conveyor.handlers import JobType
from conveyor.lifecycle import JobState
from services.worker.middleware.retries import Retries
from services.worker.middleware.time_limit import TimeLimit, limit_for

from worker_doubles import execution_of, job_record


async def noop(ctx: Any, payload: Any) -> None:
    return None


def test_the_submission_limit_wins_over_the_type_limit() -> None:
    assert limit_for(job_record(timeout_s=2.0), JobType("t", noop, timeout_s=9.0)) == 2.0
    assert limit_for(job_record(), JobType("t", noop, timeout_s=9.0)) == 9.0
    assert limit_for(job_record(), JobType("t", noop)) is None


async def test_a_timed_out_attempt_is_interrupted_and_fails_timed_out() -> None:
    execution = execution_of(job_record(attempts=1), timeout_s=1.5)
    handler = asyncio.create_task(asyncio.sleep(3600))
    change = await TimeLimit(Retries()).stop(execution, handler)
    assert handler.cancelled()
    assert execution.context.cancelled.is_set(), "the handler's cleanup is told why"
    assert change.target is JobState.SCHEDULED
    assert change.values["error"] == {
        "type": TIMED_OUT,
        "message": "the attempt ran longer than its timeout of 1.5 s",
        "attempt": 1,
    }


async def test_an_attempt_without_a_limit_cannot_time_out() -> None:
    handler = asyncio.create_task(asyncio.sleep(3600))
    try:
        with pytest.raises(RuntimeError, match="without a time limit"):
            await TimeLimit(Retries()).stop(execution_of(job_record()), handler)
    finally:
        handler.cancel()
