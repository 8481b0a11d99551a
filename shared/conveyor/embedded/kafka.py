"""A real Apache Kafka cluster (KRaft, combined broker+controller nodes) run from Maven Central's jars.

`KafkaCluster` runs one JVM per node on 127.0.0.1, from the jars `conveyor.embedded.kafka_jars` fetches
(on first use). It is meant for development and tests: the project talks to it through a
bootstrap-servers setting exactly as it would to a production Kafka.

Port scheme: node i (1-based) listens for clients on ``base_port + 2*(i-1)`` and for the controller
quorum on the port after it, so a cluster of n nodes uses the 2n consecutive ports from ``base_port``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from conveyor.embedded.kafka_jars import (
    BROKER_LOG4J,
    DEFAULT_KAFKA_VERSION,
    TOOLS_LOG4J,
    EmbeddedKafkaError,
    fetch_broker_jars,
    tail_text,
)
from conveyor.ports import port_is_free

log = logging.getLogger(__name__)

DEFAULT_BASE_PORT = 19092
DEFAULT_HEAP = "512m"
DEFAULT_START_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 30.0
FORMAT_TIMEOUT = 120.0

LOCALHOST = "127.0.0.1"
PORTS_PER_NODE = 2
MAX_PORT = 65535
# Below Linux's default ephemeral range (32768+), so that outgoing connections cannot take a port
# between `free_port_block` checking it and the broker binding it.
PORT_SEARCH_RANGE = (20000, 32000)

CLUSTER_ID_FILE = "cluster.id"
SERVER_PROPERTIES = "server.properties"
SERVER_LOG = "server.log"
STDOUT_LOG = "stdout.log"
PID_FILE = "kafka.pid"
# KafkaRaftServer logs this (kafka.server.KafkaBroker.STARTED_MESSAGE) once the broker is unfenced.
READY_LINE = b"Kafka Server started"
POLL_INTERVAL = 0.1

# Our machines have 2 cores: the defaults (8 I/O threads, 3 network threads, a 128 MiB dedupe buffer)
# only cost memory and context switches here. The dedupe buffer must stay above 1 MiB per cleaner thread.
NUM_IO_THREADS = 2
NUM_NETWORK_THREADS = 2
CLEANER_DEDUPE_BUFFER_BYTES = 8 * 1024 * 1024
# Kafka's default of 50 partitions per internal topic makes the first consumer group (or transaction)
# wait for 50 partitions to be created; a dev/test cluster needs one.
INTERNAL_TOPIC_PARTITIONS = 1


class PortInUseError(EmbeddedKafkaError):
    def __init__(self, port: int, node: int) -> None:
        super().__init__(
            f"port {LOCALHOST}:{port} (node {node}) is already in use; stop whatever listens there "
            "or choose another base port"
        )
        self.port = port
        self.node = node


# ---------------------------------------------------------------------------------------------------
# Ports


def free_port_block(count: int) -> int:
    """A base port from which `count` consecutive ports on 127.0.0.1 are free right now."""
    low, high = PORT_SEARCH_RANGE
    candidates = list(range(low, high - count, count))
    # A random start keeps concurrent test runs from all probing (and taking) the same block.
    first = random.randrange(len(candidates))
    for base in candidates[first:] + candidates[:first]:
        if all(is_port_free(base + offset) for offset in range(count)):
            return base
    raise EmbeddedKafkaError(f"no block of {count} free ports in {low}-{high}")


def is_port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:`port` (nothing is listening there)."""
    return port_is_free(LOCALHOST, port)


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# The cluster


@dataclass
class _Node:
    index: int
    dir: Path
    broker_port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = None
    # Where this start's part of each log begins: the files are appended across restarts, and an
    # earlier run's ready line must not count.
    log_offset: int = 0
    stdout_offset: int = 0

    @property
    def properties(self) -> Path:
        return self.dir / SERVER_PROPERTIES

    @property
    def log_dir(self) -> Path:
        return self.dir / "data"

    @property
    def server_log(self) -> Path:
        return self.dir / SERVER_LOG

    @property
    def stdout_log(self) -> Path:
        return self.dir / STDOUT_LOG

    @property
    def pid_file(self) -> Path:
        return self.dir / PID_FILE

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class KafkaCluster:
    """A local Kafka cluster of `nodes` combined broker+controller JVMs, with its data in `data_dir`.

    Restarting on the same `data_dir` keeps the data: the cluster id is kept there and an already
    formatted node is not formatted again.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        nodes: int = 1,
        base_port: int = DEFAULT_BASE_PORT,
        cache_dir: Path,
        version: str = DEFAULT_KAFKA_VERSION,
        heap: str = DEFAULT_HEAP,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        last_port = base_port + PORTS_PER_NODE * nodes - 1
        if base_port < 1 or last_port > MAX_PORT:
            raise ValueError(f"ports {base_port}-{last_port} are not all valid TCP ports")
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.version = version
        self.heap = heap
        self._nodes = [self._make_node(i, base_port) for i in range(1, nodes + 1)]

    def _make_node(self, index: int, base_port: int) -> _Node:
        broker_port = base_port + PORTS_PER_NODE * (index - 1)
        return _Node(index, self.data_dir / f"node-{index}", broker_port, broker_port + 1)

    # -- public properties -----------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{LOCALHOST}:{node.broker_port}" for node in self._nodes)

    @property
    def node_count(self) -> int:
        return len(self._nodes)

    @property
    def is_running(self) -> bool:
        """Whether any node's process is alive."""
        return any(node.is_alive() for node in self._nodes)

    @property
    def pids(self) -> dict[int, int]:
        """The pid of each node whose process is alive, by node number."""
        return {n.index: n.process.pid for n in self._nodes if n.process is not None and n.is_alive()}

    def broker_port(self, i: int) -> int:
        return self._node(i).broker_port

    def controller_port(self, i: int) -> int:
        return self._node(i).controller_port

    def node_dir(self, i: int) -> Path:
        return self._node(i).dir

    def node_is_running(self, i: int) -> bool:
        return self._node(i).is_alive()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start every node that is not running and wait until all of them serve clients."""
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        try:
            pending = [node for node in self._nodes if not node.is_alive()]
            self._launch_all(pending)
            # All nodes must be up before any is ready: a broker waits for the controller quorum.
            self._wait_ready(pending, deadline)
        except BaseException:
            self.stop()
            raise
        log.info("Kafka cluster at %s up in %.1fs", self.bootstrap_servers, time.monotonic() - started)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every node: SIGTERM (a clean shutdown), then SIGKILL whatever outlives `timeout`."""
        alive = [node for node in self._nodes if node.is_alive()]
        # All at once: a node's shutdown can wait on the quorum (up to Kafka's 5 s Raft shutdown
        # timeout once its peers are gone), and in parallel those waits overlap instead of adding up.
        for node in alive:
            _signal(node, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in alive:
            _reap(node, deadline)

    def stop_node(self, i: int, *, kill: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop node `i`: cleanly, or with `kill` by SIGKILL as a crash would."""
        node = self._node(i)
        if node.is_alive():
            _signal(node, signal.SIGKILL if kill else signal.SIGTERM)
            _reap(node, time.monotonic() + timeout)

    def start_node(self, i: int, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start node `i` again (the others are expected to be running) and wait until it serves."""
        node = self._node(i)
        if node.is_alive():
            return
        deadline = time.monotonic() + timeout
        try:
            self._launch_all([node])
            self._wait_ready([node], deadline)
        except BaseException:
            self.stop_node(i)
            raise

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------------

    def _node(self, i: int) -> _Node:
        if not 1 <= i <= len(self._nodes):
            raise ValueError(f"no node {i}: nodes are numbered 1 to {len(self._nodes)}")
        return self._nodes[i - 1]

    def _launch_all(self, nodes: list[_Node]) -> None:
        if not nodes:
            return
        lib = fetch_broker_jars(self.cache_dir, self.version)
        for node in nodes:
            _kill_stale(node)
        for node in nodes:
            _check_ports(node)
        cluster_id = self._cluster_id()
        for node in nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.properties.write_text(self._server_properties(node))
        self._format([n for n in nodes if not (n.log_dir / "meta.properties").is_file()], lib, cluster_id)
        for node in nodes:
            self._launch(node, lib)

    def _cluster_id(self) -> str:
        path = self.data_dir / CLUSTER_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = _new_cluster_id()
        path.write_text(cluster_id + "\n")
        return cluster_id

    def _server_properties(self, node: _Node) -> str:
        replication = min(3, len(self._nodes))
        min_isr = max(1, replication - 1)
        voters = ",".join(f"{n.index}@{LOCALHOST}:{n.controller_port}" for n in self._nodes)
        settings: dict[str, str | int] = {
            "process.roles": "broker,controller",
            "node.id": node.index,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{LOCALHOST}:{node.broker_port},CONTROLLER://{LOCALHOST}:"
            f"{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{LOCALHOST}:{node.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(node.log_dir),
            "offsets.topic.replication.factor": replication,
            "offsets.topic.num.partitions": INTERNAL_TOPIC_PARTITIONS,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": INTERNAL_TOPIC_PARTITIONS,
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min_isr,
            "share.coordinator.state.topic.num.partitions": INTERNAL_TOPIC_PARTITIONS,
            # The project creates its topics explicitly; a typo must fail, not create a topic.
            "auto.create.topics.enable": "false",
            # Consumers in tests and dev join at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": 0,
            "num.io.threads": NUM_IO_THREADS,
            "num.network.threads": NUM_NETWORK_THREADS,
            "log.cleaner.dedupe.buffer.size": CLEANER_DEDUPE_BUFFER_BYTES,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _format(self, nodes: list[_Node], lib: Path, cluster_id: str) -> None:
        # One JVM per node, run side by side: each takes a couple of seconds to start.
        runs = [(node, _start_format(node, lib, cluster_id)) for node in nodes]
        for node, process in runs:
            try:
                _, stderr = process.communicate(timeout=FORMAT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise EmbeddedKafkaError(f"formatting node {node.index} timed out") from None
            if process.returncode != 0:
                raise EmbeddedKafkaError(
                    f"formatting node {node.index} failed (exit {process.returncode}):\n"
                    f"{tail_text(stderr.decode(errors='replace'))}"
                )

    def _launch(self, node: _Node, lib: Path) -> None:
        node.log_offset = _size(node.server_log)
        node.stdout_offset = _size(node.stdout_log)
        home = lib.parent
        command = [
            _java(),
            f"-Xms{self.heap}",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={home / BROKER_LOG4J}",
            f"-Dkafka.logs.dir={node.dir}",
            "-cp",
            # Java, not a shell, expands the wildcard (there is no shell here).
            f"{lib}/*",
            "kafka.Kafka",
            str(node.properties),
        ]
        with node.stdout_log.open("ab") as out:
            # A session of its own: Ctrl-C in a terminal reaches only our process, which then stops
            # the nodes cleanly, instead of the JVMs dying behind its back.
            node.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.dir,
                start_new_session=True,
            )
        node.pid_file.write_text(f"{node.process.pid}\n")
        log.info("started Kafka node %d (pid %d) on port %d", node.index, node.process.pid, node.broker_port)

    def _wait_ready(self, nodes: list[_Node], deadline: float) -> None:
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                _raise_if_exited(node)
                if _log_has(node.server_log, node.log_offset, READY_LINE) and _accepts_connections(
                    node.broker_port
                ):
                    waiting.remove(node)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(str(n.index) for n in waiting)
                raise EmbeddedKafkaError(
                    f"Kafka node(s) {names} not serving before the deadline\n{_describe_logs(waiting[0])}"
                )
            time.sleep(POLL_INTERVAL)


# ---------------------------------------------------------------------------------------------------
# Process helpers


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise EmbeddedKafkaError("`java` (17 or newer) is not installed; the Kafka broker needs it")
    return found


def _new_cluster_id() -> str:
    """A random id in Kafka's own format, without starting a JVM for `StorageTool random-uuid`."""
    while True:
        # Kafka's Uuid.toString: URL-safe base64 of the 16 bytes, unpadded. Like Uuid.randomUuid, skip
        # ids starting with "-", which a command line would take for an option.
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not candidate.startswith("-"):
            return candidate


def _start_format(node: _Node, lib: Path, cluster_id: str) -> subprocess.Popen[bytes]:
    command = [
        _java(),
        "-Xmx256m",
        f"-Dlog4j2.configurationFile={lib.parent / TOOLS_LOG4J}",
        "-cp",
        f"{lib}/*",
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(node.properties),
        # A node formatted by an earlier run keeps its data.
        "--ignore-formatted",
    ]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _check_ports(node: _Node) -> None:
    for port in (node.broker_port, node.controller_port):
        if not is_port_free(port):
            raise PortInUseError(port, node.index)


def _kill_stale(node: _Node) -> None:
    """Stop this node's JVM left behind by an earlier run that crashed before stopping it."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if node.is_alive() or not _is_node_process(pid, node):
        return
    log.warning("stopping stale Kafka node %d (pid %d) left by an earlier run", node.index, pid)
    # Politely first: a clean shutdown spares the next start a log recovery.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_for(lambda: _stale_node_gone(pid, node), time.monotonic() + DEFAULT_STOP_TIMEOUT):
            node.pid_file.unlink(missing_ok=True)
            return
    raise EmbeddedKafkaError(f"stale Kafka node {node.index} (pid {pid}) would not die")


def _stale_node_gone(pid: int, node: _Node) -> bool:
    # Its ports too: the exiting JVM's threads may still hold them after the process looks dead.
    ports = (node.broker_port, node.controller_port)
    return not _pid_running(pid) and all(is_port_free(port) for port in ports)


def _pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name; Z and X are dead (a zombie is not yet reaped).
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_for(condition: Callable[[], bool], deadline: float) -> bool:
    """Poll `condition` until it holds (True) or `deadline` passes (False)."""
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def _is_node_process(pid: int, node: _Node) -> bool:
    """Whether `pid` is a live java running this node (pids are reused: check what it runs)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # A zombie has an empty cmdline, so it never matches.
    return (
        bool(argv[0]) and Path(os.fsdecode(argv[0])).name == "java" and os.fsencode(node.properties) in argv
    )


def _signal(node: _Node, sig: signal.Signals) -> None:
    if node.process is None:
        return
    # The JVM leads its own process group (start_new_session), so this reaches nothing else.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.process.pid, sig)


def _reap(node: _Node, deadline: float) -> None:
    """Wait for the node to exit until `deadline`, then SIGKILL it and wait for good."""
    if node.process is None:
        return
    try:
        node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        log.warning("Kafka node %d did not stop in time; killing it", node.index)
        _signal(node, signal.SIGKILL)
        node.process.wait()
    # Only once it is gone: the pid file is what lets a later run find a node we failed to stop.
    node.pid_file.unlink(missing_ok=True)


def _raise_if_exited(node: _Node) -> None:
    if node.process is not None and node.process.poll() is not None:
        code = node.process.returncode
        raise EmbeddedKafkaError(
            f"Kafka node {node.index} exited during startup (exit {code})\n{_describe_logs(node)}"
        )


def _log_has(path: Path, offset: int, needle: bytes) -> bool:
    try:
        with path.open("rb") as f:
            # A rolled-over (smaller) file started afresh; read it from its beginning.
            f.seek(offset if path.stat().st_size >= offset else 0)
            return needle in f.read()
    except FileNotFoundError:
        return False


def _describe_logs(node: _Node) -> str:
    parts = []
    for path, offset in ((node.server_log, node.log_offset), (node.stdout_log, node.stdout_offset)):
        try:
            with path.open("rb") as f:
                f.seek(offset if path.stat().st_size >= offset else 0)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            continue
        if not text.strip():
            continue
        parts.append(f"--- last lines of {path} ---\n{tail_text(text)}")
    return "\n".join(parts) or f"(no log in {node.dir})"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
