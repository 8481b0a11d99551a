"""Session-wide real infrastructure: one Apache Kafka broker and one PostgreSQL server.

Point the tests at existing servers with CONVEYOR_TEST_KAFKA_BOOTSTRAP and CONVEYOR_TEST_POSTGRES_URL
(an async SQLAlchemy URL of a user allowed to create databases); otherwise both are started here
from the broker's jars (Maven Central) and Debian's PostgreSQL packages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from conveyor.database import Database
from conveyor.embedded.kafka import PORTS_PER_NODE, KafkaCluster, free_port_block

from harness import KEY_A, KEY_B, METRICS_TOKEN, TENANT_A, TENANT_B, Stack, free_port
from postgres_server import PostgresServer

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
    server = PostgresServer(tmp_path_factory.mktemp("postgres"), port=free_port())
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


DATABASE_KINDS = ["sqlite", "postgresql"]


async def new_database_url(kind: str, directory: Path, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{directory / 'conveyor.db'}"
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    return await create_postgres_database(admin_url, f"t_{uuid.uuid4().hex[:12]}")


def deployment_env(kafka_bootstrap: str, database_url: str, directory: Path) -> dict[str, str]:
    """The CONVEYOR_ settings of one isolated deployment: its own topics, database and ports."""
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "CONVEYOR_PARTITIONS": "3",
        "CONVEYOR_API_KEYS": f"{TENANT_A}:{KEY_A},{TENANT_B}:{KEY_B}",
        "CONVEYOR_GATEWAY_PORT": str(free_port()),
        "CONVEYOR_PROGRESS_PORT": str(free_port()),
        "CONVEYOR_DATA_DIR": str(directory / "data"),
        "CONVEYOR_LEASE_S": str(TEST_LEASE_S),
        "CONVEYOR_DRAIN_GRACE_S": "5",
        "CONVEYOR_METRICS_TOKEN": METRICS_TOKEN,
        # One progress process per instance, whatever the machine's cores: the tests of its per-instance
        # caps and restarts count on it. tests/test_progress_processes.py runs several.
        "CONVEYOR_PROGRESS_PROCESSES": "1",
    }


@asynccontextmanager
async def running_stack(env: dict[str, str], directory: Path) -> AsyncIterator[Stack]:
    """Gateway, one worker and the progress service, each its own process, ready to serve."""
    log_dir = directory / "logs"
    log_dir.mkdir()
    stack = Stack(env=env, log_dir=log_dir)
    stack.start("gateway")
    stack.start("worker-1", "worker")
    stack.start("progress")
    try:
        await stack.wait_ready(stack.gateway_url)
        await stack.wait_ready(stack.progress_url.replace("ws://", "http://"))
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(params=DATABASE_KINDS)
def database_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def database_url(database_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return await new_database_url(database_kind, tmp_path, request)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated database of the test's kind, used in-process (no services)."""
    database = Database(database_url)
    await database.migrate()
    yield database
    await database.close()


@pytest.fixture
def stack_env(
    request: pytest.FixtureRequest, kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a test's stack: the deployment's, then the settings of its
    `@pytest.mark.stack_settings(...)` marks (a module's `pytestmark` first, the test's own last)."""
    env = deployment_env(kafka_bootstrap, database_url, tmp_path)
    for mark in reversed(list(request.node.iter_markers("stack_settings"))):
        env.update({name: str(value) for name, value in mark.kwargs.items()})
    return env


@pytest.fixture
async def stack(stack_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Stack]:
    """A fresh deployment for one test: for tests that kill, restart or fill it."""
    async with running_stack(stack_env, tmp_path) as running:
        yield running


@pytest.fixture(scope="module", params=DATABASE_KINDS)
async def module_stack(
    request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """One deployment shared by a module's tests that only read and submit (contract tests)."""
    directory = tmp_path_factory.mktemp(f"stack-{request.param}")
    database_url = await new_database_url(request.param, directory, request)
    async with running_stack(deployment_env(kafka_bootstrap, database_url, directory), directory) as running:
        yield running


@pytest.fixture(scope="module")
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A broker of the module's own, for tests that stop and restart Kafka (the session broker is shared).
    Its data stays in its directory, so `stop()` then `start()` brings back the same broker."""
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("private-kafka"), nodes=1, base_port=free_port_block(2), cache_dir=CACHE_DIR
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def three_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """A cluster of three brokers of the module's own, for tests that kill one."""
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("three-brokers"),
        nodes=3,
        base_port=free_port_block(3 * PORTS_PER_NODE),
        cache_dir=CACHE_DIR,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def three_broker_stack(
    three_brokers: KafkaCluster, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """A fresh deployment on `three_brokers` (SQLite), its topics replicated three times: what a
    broker failover tests (the database does not take part in it)."""
    three_brokers.start()  # in case an earlier test left a node stopped; a no-op when all run
    database_url = await new_database_url("sqlite", tmp_path, request)
    env = {
        **deployment_env(three_brokers.bootstrap_servers, database_url, tmp_path),
        "CONVEYOR_REPLICATION_FACTOR": "3",
        "CONVEYOR_TENANT_SUBMIT_RATE": "100000",
        "CONVEYOR_TENANT_SUBMIT_BURST": "100000",
    }
    async with running_stack(env, tmp_path) as running:
        try:
            yield running
        finally:
            three_brokers.start()


@pytest.fixture
async def private_kafka_stack(
    private_kafka: KafkaCluster, database_url: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """A fresh deployment on `private_kafka`, for tests that stop and restart its broker."""
    private_kafka.start()  # in case an earlier test left it stopped; a no-op when it runs
    env = deployment_env(private_kafka.bootstrap_servers, database_url, tmp_path)
    async with running_stack(env, tmp_path) as running:
        try:
            yield running
        finally:
            # Stopped while their broker is down, the services would each wait out their stop timeout.
            private_kafka.start()
