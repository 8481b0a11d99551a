"""docker-compose.yml as users run it, driven by testcontainers: one cluster for the whole module.

The cluster (three Kafka brokers, PostgreSQL, the one-shots, gateway, workers, progress) starts once
from a clean state through `deploy/compose/host-network.yml` (our Docker has no bridge; see
scripts/ensure-docker.sh) and every test below runs on it, in file order: the last one takes it down
and up again. Ryuk is off (its image cannot be pulled here); the fixture removes containers and
volumes itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.compose import DockerCompose
from testcontainers.core.container import DockerContainer

from harness import eventually, sleep_job, submit, wait_for_status

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ["docker-compose.yml", "deploy/compose/host-network.yml"]
PROJECT = "conveyor-compose-test"
# Where deploy/compose/host-network.yml puts the services on loopback.
GATEWAY_URL = "http://127.0.0.1:28000"
PROGRESS_URL = "ws://127.0.0.1:28001"
BOOTSTRAP = "127.0.0.1:24092,127.0.0.1:24192,127.0.0.1:24292"
POSTGRES_PORT = 25432
IMAGE = "conveyor:local"
LONG_RUNNING = ["kafka-1", "kafka-2", "kafka-3", "postgres", "gateway", "progress"]
# A cold build of the Conveyor image plus a cluster start fit well inside this on our 2-core machines.
UP_TIMEOUT_S = 600
JOB_WITHIN_S = 90.0
# A worker killed outright stops heartbeating; its job starts again elsewhere within the lease.
RECOVERY_WITHIN_S = 120.0
# The image's shutdown must fit the grace docker gives it before SIGKILL.
STOP_GRACE_S = 30

pytestmark = pytest.mark.timeout(UP_TIMEOUT_S)


class Cluster:
    """The compose project, its secrets, and what the tests ask of it."""

    def __init__(self, compose: DockerCompose, key: str, password: str) -> None:
        self.compose = compose
        self.key = key
        self.password = password
        # Every job a test submitted: the last test checks that they survive down and up.
        self.jobs: list[str] = []

    def run(self, *args: str, timeout: float = UP_TIMEOUT_S) -> str:
        command = [*self.compose.compose_command_property, *args]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def container_ids(self, service: str) -> list[str]:
        return self.run("ps", "-q", service).split()

    def sql(self, query: str) -> list[str]:
        """Rows of `query` (fields joined by |), run by psql inside the PostgreSQL container."""
        out = self.run(
            "exec", "-T", "postgres", "psql", "-U", "conveyor", "-d", "conveyor", "-tA", "-c", query
        )
        return [line for line in out.splitlines() if line]

    def worker_of(self, job_ids: list[str]) -> dict[str, str]:
        quoted = ",".join(f"'{job_id}'" for job_id in job_ids)
        rows = self.sql(f"SELECT id, worker_id FROM jobs WHERE id IN ({quoted}) AND worker_id IS NOT NULL")
        return dict(row.split("|", 1) for row in rows)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=GATEWAY_URL, headers={"Authorization": f"Bearer {self.key}"}, timeout=30.0
        )


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docker {args} failed: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    key, password = secrets.token_urlsafe(32), secrets.token_urlsafe(16)
    env_file = tmp_path_factory.mktemp("compose") / "cluster.env"
    env_file.write_text(
        f"COMPOSE_PROJECT_NAME={PROJECT}\nCONVEYOR_API_KEYS=acme:{key}\nPOSTGRES_PASSWORD={password}\n"
    )
    compose = DockerCompose(
        context=REPO, compose_file_name=COMPOSE_FILES, env_file=str(env_file), build=True, wait=True
    )
    cluster = Cluster(compose, key, password)
    cluster.run("down", "--volumes", "--remove-orphans")  # a clean state, whatever a crashed run left
    started = time.monotonic()
    compose.start()
    print(f"compose build + up --wait: {time.monotonic() - started:.1f}s")
    try:
        yield cluster
    finally:
        compose.stop(down=True)


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with cluster.client() as client:
        yield client


async def stream(cluster: Cluster, job_id: str) -> list[dict[str, Any]]:
    """Every event of the job's WebSocket, until the server closes it with 1000."""
    url = f"{PROGRESS_URL}/v1/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {cluster.key}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        events = [json.loads(raw) async for raw in ws]
        assert ws.close_code == 1000
    return events


async def test_the_cluster_comes_up_healthy_and_runs_a_job(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    containers = {c.Service: c for c in cluster.compose.get_containers(include_all=True)}
    for service in LONG_RUNNING:
        assert containers[service].Health == "healthy", (service, containers[service].Health)
    for one_shot in ("migrate", "topics"):
        assert containers[one_shot].State == "exited" and containers[one_shot].ExitCode == 0
    assert len(cluster.container_ids("worker")) == 2  # deploy.replicas of the shipped file

    job = await submit(client, sleep_job(2.0, steps=2))
    cluster.jobs.append(job["id"])
    assert job["links"]["events"].startswith(PROGRESS_URL)
    events = await asyncio.wait_for(stream(cluster, job["id"]), JOB_WITHIN_S)
    assert events[-1]["type"] == "state" and events[-1]["status"] == "succeeded"
    monitor = (await client.get(job["links"]["self"])).json()
    assert monitor["status"] == "succeeded"
    assert monitor["result"] == {"slept_s": 2.0, "steps": 2}


async def test_the_image_runs_as_non_root_under_tini_and_stops_within_its_grace(cluster: Cluster) -> None:
    gateway = cluster.container_ids("gateway")[0]
    assert docker("exec", gateway, "id", "-u").strip() == "10001"
    assert docker("exec", gateway, "cat", "/proc/1/comm").strip() == "tini"

    # A container of its own (testcontainers' DockerContainer): a gateway on the cluster's database.
    port = 28100
    container = (
        DockerContainer(IMAGE)
        .with_command("gateway")
        .with_env("CONVEYOR_HOST", "127.0.0.1")
        .with_env("CONVEYOR_GATEWAY_PORT", str(port))
        .with_env("CONVEYOR_KAFKA_BOOTSTRAP", BOOTSTRAP)
        .with_env(
            "CONVEYOR_DATABASE_URL",
            f"postgresql+asyncpg://conveyor:{cluster.password}@127.0.0.1:{POSTGRES_PORT}/conveyor",
        )
        .with_env("CONVEYOR_API_KEYS", f"acme:{cluster.key}")
        .with_env("CONVEYOR_TOPIC_PREFIX", "conveyor")
        .with_kwargs(network_mode="host")
    )
    container.start()
    try:

        async def answers() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(answers, JOB_WITHIN_S, "the standalone gateway to answer")
        wrapped = container.get_wrapped_container()
        started = time.monotonic()
        wrapped.stop(timeout=STOP_GRACE_S)  # SIGTERM, then SIGKILL after the grace
        took = time.monotonic() - started
        wrapped.reload()
        # uvicorn re-raises SIGTERM once its shutdown is complete: 143 (128 + 15) is a clean stop, the
        # SIGKILL after the grace would be 137.
        assert wrapped.attrs["State"]["ExitCode"] in (0, 143), wrapped.logs()[-2000:]
        assert b"Application shutdown complete" in wrapped.logs()
        assert took < STOP_GRACE_S
    finally:
        container.get_wrapped_container().remove(force=True)


async def test_three_workers_share_a_backlog(cluster: Cluster, client: httpx.AsyncClient) -> None:
    # Two workers with 8 slots each: 60 jobs of 3 s are over 10 s of backlog when the third is asked for.
    jobs = [(await submit(client, sleep_job(3.0, steps=1)))["id"] for _ in range(60)]
    cluster.run("up", "-d", "--wait", "--no-recreate", "--scale", "worker=3", "worker")
    assert len(cluster.container_ids("worker")) == 3

    async def three_workers_ran_jobs() -> bool:
        # A loaded machine can take longer than the first backlog for the third worker to join the
        # group: the backlog is kept up (16 more jobs a round) until it has run some.
        if len(set(cluster.worker_of(jobs).values())) == 3:
            return True
        jobs.extend([(await submit(client, sleep_job(3.0, steps=1)))["id"] for _ in range(16)])
        await asyncio.sleep(3.0)
        return False

    await eventually(three_workers_ran_jobs, RECOVERY_WITHIN_S, "all three workers to run jobs")
    cluster.jobs.extend(jobs)
    for job_id in jobs:
        await wait_for_status(client, job_id, {"succeeded"}, JOB_WITHIN_S * 2)


async def test_a_worker_killed_mid_job_has_its_job_finished_by_another(
    cluster: Cluster, client: httpx.AsyncClient
) -> None:
    job_id = (await submit(client, sleep_job(8.0, steps=8)))["id"]
    cluster.jobs.append(job_id)
    await wait_for_status(client, job_id, {"running"}, JOB_WITHIN_S)
    first = (await eventually(lambda: cluster.worker_of([job_id]), JOB_WITHIN_S, "the job's worker"))[job_id]
    # The container whose log names that worker (they share one hostname under host networking).
    victim = next(c for c in cluster.container_ids("worker") if first in docker("logs", c))
    docker("kill", "-s", "KILL", victim)
    done = await wait_for_status(client, job_id, {"succeeded", "failed"}, RECOVERY_WITHIN_S)
    assert done["status"] == "succeeded" and done["attempts"] >= 2
    assert cluster.worker_of([job_id])[job_id] != first
    cluster.run("up", "-d", "--wait", "--no-recreate", "--scale", "worker=3", "worker")


async def test_a_broker_killed_under_load_loses_no_job(cluster: Cluster, client: httpx.AsyncClient) -> None:
    jobs = [(await submit(client, sleep_job(0.5, steps=1)))["id"] for _ in range(30)]
    docker("kill", cluster.container_ids("kafka-2")[0])
    # Submissions go on while one of three brokers is down (min.insync.replicas 2).
    jobs += [(await submit(client, sleep_job(0.5, steps=1)))["id"] for _ in range(30)]
    cluster.jobs.extend(jobs)
    for job_id in jobs:
        done = await wait_for_status(client, job_id, {"succeeded", "failed", "canceled"}, RECOVERY_WITHIN_S)
        assert done["status"] == "succeeded", done
    cluster.run("up", "-d", "--wait", "kafka-2")


async def test_down_then_up_keeps_the_jobs(cluster: Cluster) -> None:
    cluster.run("down")  # no --volumes: the data stays
    cluster.run("up", "-d", "--wait")
    async with cluster.client() as client:
        for job_id in cluster.jobs:
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded", job_id
        # And the cluster still works after the restart.
        job = await submit(client, sleep_job(1.0, steps=1))
        await wait_for_status(client, job["id"], {"succeeded"}, JOB_WITHIN_S)
