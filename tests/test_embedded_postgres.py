"""The embedded PostgreSQL: a real server from the installed binaries, reached through SQLAlchemy.

Needs PostgreSQL's server binaries (scripts/ensure-postgres.sh installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from postgres_server import (
    PG_BIN_ENV,
    PostgresError,
    PostgresServer,
    find_pg_bin_dir,
    free_port,
)

RUNNING_AS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg") / "data", port=free_port()) as running:
        yield running


async def scalar(url: str, sql: str) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar_one()
    finally:
        await engine.dispose()


def cluster_pids(pgdata: Path) -> set[int]:
    """Live postgres processes of this data dir: the postmaster and all its children chdir into it."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (
                Path(os.readlink(proc / "cwd")) == pgdata
                and (proc / "comm").read_text().strip() == "postgres"
            ):
                pids.add(int(proc.name))
        except OSError:  # exited meanwhile, or a zombie
            continue
    return pids


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.pgdata / "postmaster.pid").read_text().split()[0])


def wait_until_dead(pid: int, timeout: float = 10) -> None:
    """Until the process is gone or a zombie (nobody may reap it here: PID 1 in a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive after {timeout}s")


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_find_pg_bin_dir_finds_the_server_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bin_dir = find_pg_bin_dir()
    assert (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file()

    monkeypatch.setenv(PG_BIN_ENV, str(bin_dir))
    assert find_pg_bin_dir() == bin_dir
    monkeypatch.setenv(PG_BIN_ENV, str(tmp_path))
    with pytest.raises(PostgresError, match=PG_BIN_ENV):
        find_pg_bin_dir()


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_serves_queries_over_sqlalchemy(server: PostgresServer) -> None:
    assert server.url == f"postgresql+asyncpg://conveyor:conveyor@127.0.0.1:{server.port}/conveyor"
    assert await scalar(server.url, "select 1") == 1

    engine = create_async_engine(server.url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("create table items (id serial primary key, name text not null)"))
            await conn.execute(text("insert into items (name) values ('a'), ('b')"))
        async with engine.connect() as conn:
            names = (await conn.execute(text("select name from items order by id"))).scalars().all()
    finally:
        await engine.dispose()
    assert names == ["a", "b"]


async def test_create_database_gives_an_isolated_database(server: PostgresServer) -> None:
    url = server.create_database("isolated")

    assert url == server.url.rsplit("/", 1)[0] + "/isolated"
    assert await scalar(url, "select current_database()") == "isolated"
    assert await scalar(url, "select current_user") == "conveyor"
    assert await scalar(url, "select count(*) from pg_tables where tablename = 'items'") == 0
    with pytest.raises(PostgresError, match="already exists"):
        server.create_database("isolated")


async def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "data", port=free_port())
    server.start()
    pgdata = server.pgdata
    assert cluster_pids(pgdata)
    assert await scalar(server.url, "select 1") == 1

    server.stop()

    assert not accepts_connections(server.port)
    assert not cluster_pids(pgdata)
    server.stop()  # idempotent


async def test_restart_keeps_data_and_reuses_a_left_over_server(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    first = PostgresServer(data_dir, port=port)
    first.start()
    try:
        engine = create_async_engine(first.url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("create table kept as select 42 as answer"))
        finally:
            await engine.dispose()
        postmaster = postmaster_pid(first)

        # As after a crashed run: a new object on the same data dir finds the server still running.
        second = PostgresServer(data_dir, port=port)
        second.start()
        assert postmaster_pid(second) == postmaster

        # On another port it cannot be reused as is: it is restarted there, data intact.
        third = PostgresServer(data_dir, port=free_port())
        third.start()
        assert not accepts_connections(port)
        assert await scalar(third.url, "select answer from kept") == 42
    finally:
        first.stop()
    assert not cluster_pids(first.pgdata)


async def test_a_killed_server_recovers_on_the_next_start(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path / "data", port=free_port())
    server.start()
    try:
        killed = postmaster_pid(server)
        os.kill(killed, signal.SIGKILL)
        wait_until_dead(killed)

        # Its postmaster.pid and socket lock remain, naming a pid that may linger as a zombie.
        server.start()
        assert postmaster_pid(server) != killed
        assert await scalar(server.url, "select 1") == 1
    finally:
        server.stop()
    assert not cluster_pids(server.pgdata)


@pytest.mark.skipif(not RUNNING_AS_ROOT, reason="only root has to keep clusters outside data_dir")
def test_as_root_a_cluster_stays_in_data_dir_when_postgres_can_reach_it() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="conveyor-pg-test-"))
    try:
        data_dir.chmod(0o755)  # mkdtemp makes it 0700, which the postgres user could not enter
        with PostgresServer(data_dir, port=free_port()) as server:
            assert server.pgdata == data_dir.resolve() / "pgdata"
            assert server.pgdata.stat().st_uid != 0
    finally:
        shutil.rmtree(data_dir)


@pytest.mark.skipif(not RUNNING_AS_ROOT, reason="only root keeps clusters in shadow dirs")
def test_as_root_an_orphaned_shadow_cluster_is_collected(tmp_path: Path) -> None:
    # pytest's own dirs (0700) are out of the postgres user's reach: the cluster goes to a shadow dir.
    orphan = PostgresServer(tmp_path / "orphan", port=free_port())
    orphan.start()
    shadow = orphan.pgdata.parent
    assert not shadow.is_relative_to(tmp_path)
    assert (tmp_path / "orphan" / "pgdata").resolve() == orphan.pgdata

    # Its data dir vanishes with the server still running (a crashed run, then pytest pruning it).
    shutil.rmtree(tmp_path / "orphan")
    with PostgresServer(tmp_path / "next", port=free_port()):
        assert not shadow.exists()
        assert not accepts_connections(orphan.port)
