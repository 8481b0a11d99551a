"""The progress writer: a handler never waits for a report, the newest report wins while one is being
written, and a report that fails is not a failed job."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from services.worker.reporting import ProgressWriter

Report = tuple[float | None, str | None]


class GatedWrites:
    """Writes that each wait for the test to let them through."""

    def __init__(self) -> None:
        self.written: list[Report] = []
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.fail_next = False

    async def __call__(self, percent: float | None, message: str | None) -> None:
        self.started.set()
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the database does not answer")
        self.written.append((percent, message))


async def test_a_report_is_written_and_flush_waits_for_it() -> None:
    writes = GatedWrites()
    writer = ProgressWriter("job-1", writes)
    writer.report(10, "started")
    assert writes.written == [], "the handler does not wait for the write"
    writes.gate.set()
    await writer.flush()
    assert writes.written == [(10, "started")]


async def test_reports_made_during_a_write_are_replaced_by_the_newest() -> None:
    writes = GatedWrites()
    writer = ProgressWriter("job-1", writes)
    writer.report(10, None)
    await writes.started.wait()  # the first write is in flight
    writer.report(20, None)
    writer.report(30, None)
    writer.report(40, "newest")
    writes.gate.set()
    await writer.flush()
    assert writes.written == [(10, None), (40, "newest")]


async def test_a_failed_write_is_logged_and_the_next_report_still_written() -> None:
    writes = GatedWrites()
    writer = ProgressWriter("job-1", writes)
    writes.fail_next = True
    with capture_logs() as logs:
        writer.report(10, None)
        await writes.started.wait()
        writer.report(20, None)
        writes.gate.set()
        await writer.flush()
    assert writes.written == [(20, None)]
    assert [record["job_id"] for record in logs if record["event"] == "progress.write_failed"] == ["job-1"]


async def test_flush_with_no_reports_returns_at_once() -> None:
    await ProgressWriter("job-1", GatedWrites()).flush()
