"""Session-wide real infrastructure: one Apache Kafka broker and one PostgreSQL server.

Point the tests at existing servers with CONVEYOR_TEST_KAFKA_BOOTSTRAP and CONVEYOR_TEST_POSTGRES_URL
(an async SQLAlchemy URL of a user allowed to create databases); otherwise both are started here
from the broker's jars (Maven Central) and Debian's PostgreSQL packages.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from conveyor.embedded.kafka import KafkaCluster, free_port_block
from conveyor.embedded.postgres import PostgresServer
from conveyor.embedded.postgres import free_port as free_pg_port
from harness import KEY_A, KEY_B, TENANT_A, TENANT_B, Stack

KAFKA_ENV = "CONVEYOR_TEST_KAFKA_BOOTSTRAP"
POSTGRES_ENV = "CONVEYOR_TEST_POSTGRES_URL"
CACHE_DIR = Path(os.environ.get("CONVEYOR_CACHE_DIR", Path.home() / ".cache" / "conveyor"))
# Short leases keep the crash-recovery tests quick; production defaults to 15 s.
TEST_LEASE_S = 3.0


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get(KAFKA_ENV):
        yield os.environ[KAFKA_ENV]
        return
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("kafka"), nodes=1, base_port=free_port_block(2), cache_dir=CACHE_DIR
    )
    cluster.start()
    try:
        yield cluster.bootstrap_servers
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get(POSTGRES_ENV):
        yield os.environ[POSTGRES_ENV]
        return
    server = PostgresServer(tmp_path_factory.mktemp("postgres"), port=free_pg_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def create_postgres_database(admin_url: str, name: str) -> str:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def database_url(database_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if database_kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'conveyor.db'}"
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    return await create_postgres_database(admin_url, f"t_{uuid.uuid4().hex[:12]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def stack_env(kafka_bootstrap: str, database_url: str, tmp_path: Path) -> dict[str, str]:
    """The CONVEYOR_ settings of one isolated deployment: its own topics, database and ports."""
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "CONVEYOR_PARTITIONS": "3",
        "CONVEYOR_API_KEYS": f"{TENANT_A}:{KEY_A},{TENANT_B}:{KEY_B}",
        "CONVEYOR_GATEWAY_PORT": str(free_port()),
        "CONVEYOR_PROGRESS_PORT": str(free_port()),
        "CONVEYOR_DATA_DIR": str(tmp_path / "data"),
        "CONVEYOR_LEASE_S": str(TEST_LEASE_S),
        "CONVEYOR_DRAIN_GRACE_S": "5",
    }


@pytest.fixture
async def stack(stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    """Gateway, one worker and the progress service, each its own process, ready to serve."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    running = Stack(env=stack_env, log_dir=log_dir)
    running.start("gateway")
    running.start("worker-1", "worker")
    running.start("progress")
    try:
        await running.wait_ready(running.gateway_url)
        await running.wait_ready(running.progress_url.replace("ws://", "http://"))
        yield running
    finally:
        running.stop_all()
