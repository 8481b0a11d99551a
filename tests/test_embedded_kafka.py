"""The embedded Kafka cluster, against real brokers: data kept across a restart, and a 3-node cluster
that keeps accepting (and keeps) writes after one broker is killed.

The jars are fetched once into the shared cache (~/.cache/conveyor); every later run reuses them.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from conveyor.embedded.kafka import (
    PORTS_PER_NODE,
    KafkaCluster,
    PortInUseError,
    free_port_block,
    is_port_free,
)
from conveyor.embedded.kafka_jars import DEFAULT_CACHE_DIR

CONSUME_TIMEOUT = 60.0


class ClusterFactory(Protocol):
    def __call__(self, data_dir: Path, *, nodes: int, base_port: int) -> KafkaCluster: ...


@pytest.fixture
def make_cluster() -> Iterator[ClusterFactory]:
    """Builds clusters on the shared jar cache, and stops every one of them whatever the test did."""
    clusters: list[KafkaCluster] = []

    def make(data_dir: Path, *, nodes: int, base_port: int) -> KafkaCluster:
        cluster = KafkaCluster(data_dir, nodes=nodes, base_port=base_port, cache_dir=DEFAULT_CACHE_DIR)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
        assert not cluster.is_running


async def create_topic(bootstrap: str, topic: str, *, partitions: int, replication: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        configs = {"min.insync.replicas": str(max(1, replication - 1))}
        response = await admin.create_topics(
            [NewTopic(topic, partitions, replication, topic_configs=configs)]
        )
    finally:
        await admin.close()
    errors = [(name, code, message) for name, code, message in response.topic_errors if code != 0]
    assert not errors, errors


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for value in values:
            # The value as key spreads the messages over all partitions (and so over every leader).
            await producer.send_and_wait(topic, value, key=value)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Read the topic from the start until `count` messages came, or fail at the deadline."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    received: list[bytes] = []
    deadline = time.monotonic() + CONSUME_TIMEOUT
    try:
        while len(received) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            received.extend(record.value for records in batches.values() for record in records)
    finally:
        await consumer.stop()
    return received


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_single_node_serves_and_keeps_data_across_restart(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kafka"
    base_port = free_port_block(PORTS_PER_NODE)
    cluster = make_cluster(data_dir, nodes=1, base_port=base_port)
    await asyncio.to_thread(cluster.start)
    assert cluster.bootstrap_servers == f"127.0.0.1:{base_port}"

    await create_topic(cluster.bootstrap_servers, "jobs", partitions=1, replication=1)
    await produce(cluster.bootstrap_servers, "jobs", [b"job-1"])
    assert await consume(cluster.bootstrap_servers, "jobs", 1) == [b"job-1"]

    pids = list(cluster.pids.values())
    assert len(pids) == 1
    await asyncio.to_thread(cluster.stop)
    assert not cluster.is_running
    assert not any(process_exists(pid) for pid in pids)
    assert is_port_free(base_port)
    assert is_port_free(base_port + 1)

    restarted = make_cluster(data_dir, nodes=1, base_port=base_port)
    await asyncio.to_thread(restarted.start)
    assert await consume(restarted.bootstrap_servers, "jobs", 1) == [b"job-1"]

    # A new run on the same data dir, as after a supervisor crashed without stopping its node: the
    # pid file names a live node, which must be replaced rather than reported as a busy port.
    stale_pid = restarted.pids[1]
    replacement = make_cluster(data_dir, nodes=1, base_port=base_port)
    await asyncio.to_thread(replacement.start)
    # The stale node is this test's own child, so it lingers as a zombie until its parent reaps it;
    # is_running reaps it (in a real crash, init does).
    assert not restarted.is_running
    assert not process_exists(stale_pid)
    assert replacement.pids[1] != stale_pid
    assert await consume(replacement.bootstrap_servers, "jobs", 1) == [b"job-1"]


def test_a_busy_port_is_reported_not_replaced(make_cluster: ClusterFactory, tmp_path: Path) -> None:
    base_port = free_port_block(PORTS_PER_NODE)
    cluster = make_cluster(tmp_path / "kafka", nodes=1, base_port=base_port)
    busy = f"127.0.0.1:{base_port + 1}"
    with socket.create_server(("127.0.0.1", base_port + 1)), pytest.raises(PortInUseError, match=busy):
        cluster.start()
    assert not cluster.is_running


async def test_three_nodes_keep_every_write_when_a_broker_is_killed(
    make_cluster: ClusterFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(tmp_path / "kafka", nodes=3, base_port=free_port_block(3 * PORTS_PER_NODE))
    await asyncio.to_thread(cluster.start)
    bootstrap = cluster.bootstrap_servers
    await create_topic(bootstrap, "jobs", partitions=3, replication=3)

    before = [f"before-{n}".encode() for n in range(20)]
    await produce(bootstrap, "jobs", before)

    killed_pid = cluster.pids[2]
    await asyncio.to_thread(cluster.stop_node, 2, kill=True)
    assert not cluster.node_is_running(2)
    assert not process_exists(killed_pid)

    # Two replicas of three are still in sync, which min.insync.replicas=2 accepts with acks=all.
    after = [f"after-{n}".encode() for n in range(20)]
    await produce(bootstrap, "jobs", after)

    received = await consume(bootstrap, "jobs", len(before) + len(after))
    assert sorted(received) == sorted(before + after)
