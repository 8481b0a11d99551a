"""`conveyor run` (what `make run` starts): the embedded stack as separate, supervised processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.embedded.kafka import free_port_block, is_port_free

from harness import ConveyorRun, alive, descendants, eventually, free_port, start_conveyor, wait_for_status

STARTUP_S = 180.0
STOP_S = 90.0


class RunningStack(ConveyorRun):
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        super().__init__(env, data_dir.parent / "run.log")
        self.data_dir = data_dir

    def client(self) -> httpx.AsyncClient:
        key = (self.data_dir / "dev-api-key").read_text().strip()
        return httpx.AsyncClient(base_url=self.gateway, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def run_stack(tmp_path: Path) -> Iterator[RunningStack]:
    kafka_port = free_port_block(2)
    env = {
        "CONVEYOR_DATA_DIR": str(tmp_path / "data"),
        "CONVEYOR_KAFKA_PORT": str(kafka_port),
        "CONVEYOR_GATEWAY_PORT": str(free_port()),
        "CONVEYOR_PROGRESS_PORT": str(free_port()),
        "CONVEYOR_WORKERS": "2",
        # The progress service as a parent and two processes on its port, whatever the machine's cores.
        "CONVEYOR_PROGRESS_PROCESSES": "2",
        "CONVEYOR_LEASE_S": "3",
        # Worker n serves its metrics on this plus n - 1.
        "CONVEYOR_WORKER_METRICS_PORT": str(free_port_block(2)),
        "CONVEYOR_RUN_METRICS_PORT": str(free_port()),
    }
    for name in (
        "CONVEYOR_KAFKA_BOOTSTRAP",
        "CONVEYOR_DATABASE_URL",
        "CONVEYOR_API_KEYS",
        "CONVEYOR_METRICS_TOKEN",
    ):
        env[name] = ""  # the embedded defaults, whatever the caller's environment says
    stack = RunningStack(tmp_path / "data", env)
    yield stack
    if stack.process is not None and stack.process.poll() is None:
        os.killpg(stack.process.pid, signal.SIGKILL)
        for pid in descendants(stack.process.pid):
            os.kill(pid, signal.SIGKILL)


async def test_run_supervises_stops_cleanly_and_keeps_jobs(run_stack: RunningStack) -> None:
    process = run_stack.start()
    await eventually(run_stack.ready, STARTUP_S, "the embedded stack to be ready")
    tree = descendants(process.pid)
    names = {pid: cmd for pid, cmd in tree.items() if "-m conveyor " in cmd}
    assert sorted(cmd.split("-m conveyor ")[1].split()[0] for cmd in names.values()) == [
        "gateway",
        "progress",
        "progress",
        "progress",
        "worker",
        "worker",
    ]
    assert sum("--parent-pid" in cmd for cmd in names.values()) == 2
    assert "(2 processes on the port)" in run_stack.log_path.read_text()
    assert any("kafka.Kafka" in cmd for cmd in tree.values()) or _kafka_pids(run_stack.data_dir)

    async with run_stack.client() as client:
        job = (
            await client.post("/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": 1, "steps": 2}})
        ).json()
        assert (await wait_for_status(client, job["id"], {"succeeded"}, 60))["result"]["steps"] == 2
    await _each_worker_serves_its_metrics(run_stack, job_type="demo.sleep")

    # The supervisor restarts a service that dies, as compose's restart policy would.
    gateway_pid = next(pid for pid, cmd in names.items() if cmd.endswith("conveyor gateway "))
    os.kill(gateway_pid, signal.SIGKILL)
    await eventually(lambda: not alive(gateway_pid), 10, "the gateway to die")
    await eventually(run_stack.ready, 60, "the restarted gateway")
    assert gateway_pid not in descendants(process.pid)

    # SIGTERM stops everything it started, Kafka included.
    everything = set(descendants(process.pid)) | set(_kafka_pids(run_stack.data_dir))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_S) == 0
    await eventually(lambda: not any(alive(pid) for pid in everything), 30, "every process to be gone")

    # A second run starts without fetching anything and keeps the first run's jobs.
    process = run_stack.start()
    await eventually(run_stack.ready, 60, "the second start")
    async with run_stack.client() as client:
        again = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert again["status"] == "succeeded"
    assert "Downloading" not in run_stack.log_path.read_text()
    # Ctrl-C in the terminal (SIGINT) stops everything too.
    everything = set(descendants(process.pid)) | set(_kafka_pids(run_stack.data_dir))
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=STOP_S) == 0
    await eventually(lambda: not any(alive(pid) for pid in everything), 30, "every process to be gone")


async def _each_worker_serves_its_metrics(run_stack: RunningStack, job_type: str) -> None:
    """Each worker on its own port, printed in the banner, with /healthz; /metrics for the token that
    the stack made (its owner's alone), and one of them counted the job."""
    token_file = run_stack.data_dir / "metrics-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    base = int(run_stack.env["CONVEYOR_WORKER_METRICS_PORT"])
    banner = run_stack.log_path.read_text()
    finished = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        for n, port in enumerate((base, base + 1), start=1):
            url = f"http://127.0.0.1:{port}"
            assert f"worker-{n} {url}/metrics" in banner
            assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
            assert (await client.get(f"{url}/metrics")).status_code == 401
            metrics = await client.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
            finished += sum(
                sample.value
                for family in text_string_to_metric_families(metrics.text)
                for sample in family.samples
                if sample.name == "conveyor_jobs_finished_total"
                and sample.labels == {"type": job_type, "outcome": "succeeded"}
            )
        gateway = await client.get(
            f"{run_stack.gateway}/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        assert gateway.status_code == 200
        # `conveyor run` itself: the workers it wants (two, pinned), for the same token.
        run_url = f"http://127.0.0.1:{run_stack.env['CONVEYOR_RUN_METRICS_PORT']}"
        assert f"run {run_url}/metrics" in banner
        assert (await client.get(f"{run_url}/metrics")).status_code == 401
        run = await client.get(f"{run_url}/metrics", headers={"Authorization": f"Bearer {token}"})
        desired = [
            sample.value
            for family in text_string_to_metric_families(run.text)
            for sample in family.samples
            if sample.name == "conveyor_autoscaler_desired_workers"
        ]
    assert token not in banner
    assert finished == 1
    assert desired == [2]


@pytest.mark.parametrize("stop_when", ["starting", "serving"])
async def test_kafka_runs_alone_until_stopped(tmp_path: Path, stop_when: str) -> None:
    port = free_port_block(2)
    env = {**os.environ, "CONVEYOR_KAFKA_PORT": str(port), "CONVEYOR_DATA_DIR": str(tmp_path)}
    process = start_conveyor(["kafka", "start"], env, tmp_path / "kafka.log")
    try:
        await eventually(lambda: bool(_kafka_pids(tmp_path)), 120, "the Kafka process to appear")
        if stop_when == "serving":
            await eventually(
                lambda: "Kafka is up" in (tmp_path / "kafka.log").read_text(), 120, "Kafka to serve"
            )
        kafka = _kafka_pids(tmp_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_S) == 0
        await eventually(lambda: not any(alive(pid) for pid in kafka), 30, "Kafka to be gone")
        assert is_port_free(port)
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_stop_during_startup_leaves_nothing_running(run_stack: RunningStack) -> None:
    process = run_stack.start()
    # Stop while Kafka is still starting: its JVM exists, the services do not yet.
    await eventually(lambda: bool(_kafka_pids(run_stack.data_dir)), 120, "the Kafka process to appear")
    kafka = _kafka_pids(run_stack.data_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=STOP_S) == 0
    await eventually(lambda: not any(alive(pid) for pid in kafka), 30, "Kafka to be gone")
    assert not _kafka_pids(run_stack.data_dir)


def _kafka_pids(data_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "kafka.Kafka" in cmdline and str(data_dir) in cmdline:
                pids.append(int(entry.name))
    return pids
