"""The database's disk full (SQLite on a small tmpfs of its own): submissions are answered 503 with
`Retry-After`, nothing half-written is left, and everything recovers once space returns."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, select

from conveyor.database import Database
from conveyor.models import JOBS

from harness import PROBLEM_JSON, Stack, event_history, eventually, wait_for_status

DISK_SIZE = "24m"
FILL_CHUNK = b"\0" * (256 * 1024)
# Submissions tried on the full disk before one must have been refused: SQLite may still fit some
# commits into the space its write-ahead log already holds.
MAX_TRIES = 500
RECOVERY_WITHIN_S = 60
DONE = {"succeeded", "failed", "canceled"}


@pytest.fixture
def database_kind() -> str:
    # PostgreSQL answers a full disk by stopping (a PANIC on its write-ahead log) and comes back by its
    # own crash recovery: to the gateway that is the database being down, tested in
    # test_gateway_durability.py. SQLite stays up and refuses each write: this module's case.
    return "sqlite"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_SIZE of the test's own, mounted for it (the tests run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


@pytest.fixture
def database_url(small_disk: Path) -> str:
    return f"sqlite+aiosqlite:///{small_disk / 'conveyor.db'}"


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; the file, to delete for the space to come back."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(FILL_CHUNK)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_a_full_disk_gets_503s_leaves_nothing_half_written_and_recovers(
    stack: Stack, small_disk: Path, database_url: str
) -> None:
    async with stack.client() as client:
        before = (await client.post("/v1/jobs", json={"type": "demo.echo", "payload": "before"})).json()
        await wait_for_status(client, before["id"], DONE, 60)

        filler = fill(small_disk)
        accepted: list[str] = []
        refused = None
        for _ in range(MAX_TRIES):
            response = await client.post("/v1/jobs", json={"type": "demo.echo", "payload": "full"})
            if response.status_code == 202:
                accepted.append(response.json()["id"])
                continue
            refused = response
            break
        assert refused is not None, f"{MAX_TRIES} submissions on a full disk were all accepted"
        response = refused
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM_JSON
        assert int(response.headers["retry-after"]) > 0

        filler.unlink()

        async def accepted_again() -> bool:
            answer = await client.post("/v1/jobs", json={"type": "demo.echo", "payload": "after"})
            if answer.status_code == 202:
                accepted.append(answer.json()["id"])
                return True
            return False

        await eventually(accepted_again, RECOVERY_WITHIN_S, "submissions to be accepted again")
        finals = [await wait_for_status(client, job_id, DONE, RECOVERY_WITHIN_S) for job_id in accepted]

    assert {job["status"] for job in finals} == {"succeeded"}
    db = Database(database_url)
    try:
        for job_id in [before["id"], *accepted]:
            await event_history(db, job_id)  # complete from seq 1 to its last: nothing half-written

        def job_count(connection: Connection) -> int:
            return int(connection.execute(select(func.count()).select_from(JOBS)).scalar_one())

        # Every job is one that got a 202: the refused submission left nothing.
        assert await db.read(job_count) == 1 + len(accepted)
    finally:
        await db.close()
