"""`conveyor run`: the whole embedded stack in the foreground, each service its own process.

Kafka (unless CONVEYOR_KAFKA_BOOTSTRAP names a cluster), then migrations and topics, then the
gateway, the workers and the progress service under the supervisor. The workers are scaled between
CONVEYOR_WORKERS_MIN and CONVEYOR_WORKERS_MAX on their consumer lag (`conveyor.autoscaler`), unless
the two are equal (or CONVEYOR_WORKERS pins the count). Ctrl-C or SIGTERM stops them all, Kafka
last. State lives in the data folder, so a second run keeps the first run's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console

from conveyor import tracing
from conveyor.auth import generate_key
from conveyor.autoscaler import DESIRED_WORKERS, Autoscaler, worker_name
from conveyor.autoscaling import Policy
from conveyor.background import BackgroundTask
from conveyor.broker import BrokerUnavailable, topic_partitions
from conveyor.database import Database
from conveyor.lag import GroupLag
from conveyor.metrics_server import MetricsServer
from conveyor.settings import Settings
from conveyor.stopping import STOP_SIGNALS, StopRequested, ignore_stop_signals, raise_on_stop_signals
from conveyor.supervisor import ServiceSpec, Supervisor
from conveyor.topics import job_topics
from conveyor.topics_setup import ensure_deployment_topics

DEV_TENANT = "dev"
DEV_KEY_FILE = "dev-api-key"
# The token `/metrics` asks for, made once like the key (unless CONVEYOR_METRICS_TOKEN sets one).
METRICS_TOKEN_FILE = "metrics-token"
# The development key's file (and the metrics token's): its owner's alone.
DEV_KEY_MODE = 0o600
TOPICS_TIMEOUT_S = 60.0

# soft_wrap: never break the printed commands, so they can be copied whole.
console = Console(soft_wrap=True)


def dev_api_key(data_dir: Path, name: str = DEV_KEY_FILE) -> str:
    """The development key (or another secret of the stack's, by file name), made once and kept in the
    data folder so it survives restarts."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    key = generate_key()
    try:
        # Created with its mode, never readable by others (written first and chmod'ed after, it would
        # be for a moment). O_EXCL: of two runs starting at once, one writes the key, the other reads it.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DEV_KEY_MODE)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    return key


def run_stack(settings: Settings) -> int:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = dev_api_key(data_dir)
    api_keys = settings.api_keys or f"{DEV_TENANT}:{key}"
    metrics_token = settings.metrics_token.get_secret_value() or dev_api_key(data_dir, METRICS_TOKEN_FILE)
    # Until the supervisor takes over the signals, a stop request unwinds through `finally`, so a Kafka
    # that is starting (its own process session) is stopped too, never left behind.
    raise_on_stop_signals()

    cluster = None
    try:
        bootstrap = settings.kafka_bootstrap
        if not bootstrap:
            from conveyor.embedded.kafka import KafkaCluster

            console.print("Starting Kafka (KRaft, one node)...")
            cluster = KafkaCluster(
                data_dir / "kafka",
                nodes=1,
                base_port=settings.kafka_port,
                cache_dir=settings.cache_dir,
                version=settings.kafka_version,
            )
            cluster.start()
            bootstrap = cluster.bootstrap_servers
        env = {
            "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
            "CONVEYOR_API_KEYS": api_keys,
            "CONVEYOR_DATA_DIR": str(data_dir),
            "CONVEYOR_DATABASE_URL": settings.resolved_database_url,
            "CONVEYOR_METRICS_TOKEN": metrics_token,
        }
        partitions = asyncio.run(_prepare(settings, bootstrap))
        policy = worker_policy(settings, partitions)
        worker = functools.partial(worker_spec, settings, env, _worker_stop_timeout_s(settings))
        specs = [ServiceSpec("gateway", _conveyor("gateway"), env)]
        specs += [worker(n) for n in range(1, policy.minimum + 1)]
        specs.append(ServiceSpec("progress", _conveyor("progress"), env))
        _print_banner(settings, bootstrap, key if not settings.api_keys else None, policy)
        lag = GroupLag(bootstrap, settings.topic_prefix) if policy.minimum < policy.maximum else None
        # Its own /metrics (the autoscaler's gauge) asks for the token the services were given.
        own = settings.model_copy(update={"metrics_token": SecretStr(metrics_token)})
        asyncio.run(_supervise(specs, policy, lag, worker, MetricsServer(own, own.run_metrics_port, "run")))
    except StopRequested as stop:
        console.print(f"{stop} received while starting.")
    finally:
        ignore_stop_signals()
        if cluster is not None:
            console.print("Stopping Kafka...")
            cluster.stop()
    console.print("Stopped.")
    return 0


def worker_metrics_port(settings: Settings, n: int) -> int:
    """The metrics port of worker n (1, 2, ...) of the stack: each its own, counting up from the
    setting's; 0 (no metrics server) if the setting is 0."""
    return settings.worker_metrics_port + n - 1 if settings.worker_metrics_port else 0


def _conveyor(command: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", command]


def worker_spec(settings: Settings, env: dict[str, str], stop_timeout_s: float, number: int) -> ServiceSpec:
    """Worker `number` of the stack (`worker-<number>`), with its own metrics port."""
    port = {"CONVEYOR_WORKER_METRICS_PORT": str(worker_metrics_port(settings, number))}
    return ServiceSpec(
        worker_name(number), _conveyor("worker"), {**env, **port}, stop_timeout_s=stop_timeout_s
    )


def _worker_stop_timeout_s(settings: Settings) -> float:
    # A worker is stopped by its drain: it gets its worst case before it is killed, never less.
    from services.worker.middleware.drain import worst_case_shutdown_s

    return worst_case_shutdown_s(settings.drain_grace_s)


def worker_policy(settings: Settings, partitions: int) -> Policy:
    """The autoscaling policy from the settings, its maximum held to the job topics' partitions: a
    worker beyond them would own no partition of the topic with the fewest."""
    minimum, maximum = settings.worker_bounds
    if maximum > partitions:
        console.print(f"At most {partitions} workers: the job topics have {partitions} partitions.")
    maximum = min(maximum, partitions)
    return Policy(
        minimum=min(minimum, maximum),
        maximum=maximum,
        slots_per_worker=settings.worker_concurrency,
        scale_in_after_s=settings.workers_idle_s,
    )


async def _prepare(settings: Settings, bootstrap: str) -> int:
    """Migrate the database and create the topics; the partitions of the job topic with the fewest."""
    db = Database(settings.resolved_database_url)
    try:
        await db.migrate()
    finally:
        await db.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TOPICS_TIMEOUT_S
    while True:
        try:
            await ensure_deployment_topics(settings, bootstrap)
            counts = [
                len(await topic_partitions(bootstrap, topic)) for topic in job_topics(settings.topic_prefix)
            ]
            return min(counts)
        except BrokerUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(1)


async def _supervise(
    specs: list[ServiceSpec],
    policy: Policy,
    lag: GroupLag | None,
    worker: Callable[[int], ServiceSpec],
    metrics_server: MetricsServer,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    supervisor = Supervisor(specs)
    scaling = BackgroundTask("autoscaler", Autoscaler(supervisor, policy, lag, worker).run) if lag else None
    DESIRED_WORKERS.set(policy.minimum)  # a pinned count is the count wanted, with no autoscaler to say so
    await metrics_server.start()
    try:
        if scaling is not None:
            scaling.start()
        supervising = asyncio.create_task(supervisor.run(stop))
        await stop.wait()
        if scaling is not None:
            await scaling.stop()  # no worker is added or retired while the supervisor stops them all
        await supervising
    finally:
        await metrics_server.stop()
        for signum in STOP_SIGNALS:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def _print_banner(settings: Settings, bootstrap: str, key: str | None, policy: Policy) -> None:
    gateway = f"http://{settings.host}:{settings.gateway_port}"
    console.rule("[bold]Conveyor is running[/bold]")
    console.print(f"Gateway   {gateway}   (API docs: {gateway}/docs)")
    processes = settings.progress_process_count
    console.print(
        f"Progress  ws://{settings.host}:{settings.progress_port}/v1/jobs/<id>/events"
        f"   ({processes} process{'es' if processes > 1 else ''} on the port)"
    )
    # The key in the fragment signs the page in; browsers never send a fragment to the server.
    console.print(f"Dashboard {gateway}/dashboard/" + (f"#key={key}" if key else ""))
    if policy.minimum < policy.maximum:
        workers = f"{policy.minimum} to {policy.maximum}, scaled on the job topics' consumer lag"
    else:
        workers = f"{policy.minimum} (pinned: not scaled)"
    console.print(f"Workers   {workers}")
    console.print(f"Kafka     {bootstrap}")
    console.print(f"Database  {settings.resolved_database_url}")
    progress = f"http://{settings.host}:{settings.progress_port}"
    # Every worker the autoscaler may start: worker n's port is fixed by n.
    worker_metrics = ", ".join(
        f"worker-{n} http://{settings.host}:{port}/metrics"
        for n in range(1, policy.maximum + 1)
        if (port := worker_metrics_port(settings, n))
    )
    run_metrics = f", run http://{settings.host}:{settings.run_metrics_port}/metrics"
    console.print(
        f"Metrics   {gateway}/metrics, {progress}/metrics"
        + (f", {worker_metrics}" if worker_metrics else "")
        + (run_metrics if settings.run_metrics_port else "")
    )
    if not settings.metrics_token.get_secret_value():
        console.print(
            f"          (Authorization: Bearer <the token in {settings.data_dir}/{METRICS_TOKEN_FILE}>)"
        )
    if (traces := tracing.export_endpoint()) is not None:
        console.print(f"Traces    {traces} (OTLP/HTTP)")
    if key:
        console.print(
            f"API key   [bold]{key}[/bold]   (tenant {DEV_TENANT!r}; kept in {settings.data_dir}/dev-api-key)"
        )
    console.print("Try:")
    console.print(
        f"  curl -i -H 'Authorization: Bearer {key or '<key>'}' -H 'Content-Type: application/json' "
        f"""-d '{{"type": "demo.sleep", "payload": {{"seconds": 2, "steps": 4}}}}' {gateway}/v1/jobs"""
    )
    console.print("Ctrl-C stops everything.")
    console.rule()
