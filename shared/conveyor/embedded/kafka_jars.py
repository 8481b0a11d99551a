"""The Kafka broker's jars, from Maven Central: resolved once into a cache shared by the machine.

There is no Docker on our machines, but Maven Central publishes the broker itself
(`org.apache.kafka:kafka_2.13`), so `fetch_broker_jars` lets Maven resolve its runtime classpath once
into a cache, with the log4j configurations the broker and its tools run with. `conveyor.embedded.kafka`
runs the cluster from there.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_KAFKA_VERSION = "4.1.1"
SCALA_BINARY_VERSION = "2.13"
# The kafka_2.13 POM brings no SLF4J binding (the broker would then log nothing). Kafka still codes
# against slf4j-api 1.7, so the binding is log4j's 1.x bridge, with log4j's three jars on one version.
LOG4J_VERSION = "2.25.5"
SLF4J_VERSION = "1.7.36"
# Pinned so that a new plugin release can never change what a cached fetch means; 3.6.1 runs on the
# Maven 3.8 that Debian ships.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"

# Where callers keep the jars: shared by every checkout and test run on the machine.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "conveyor"
FETCH_TIMEOUT = 900.0

COMPLETE_MARKER = ".complete"
BROKER_LOG4J = "log4j2-broker.properties"
TOOLS_LOG4J = "log4j2-tools.properties"
LOG_TAIL_LINES = 40

_POM_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by conveyor.embedded.kafka_jars: only resolves the Kafka broker's runtime classpath. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.conveyor</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-api</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version>
    </dependency>
  </dependencies>
</project>
"""

# The broker logs to a size-capped file in its node dir (`kafka.logs.dir` is set per node). INFO keeps
# the ready line and enough to debug a failed test; the chattiest loggers are held at WARN.
_BROKER_LOG4J_CONFIG = """\
status = warn
# Kafka logs its own shutdown from a JVM shutdown hook: log4j's hook must not close the log first.
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""

# Tools (StorageTool) log to stderr at WARN only, so their stdout stays clean.
_TOOLS_LOG4J_CONFIG = """\
status = warn
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = stderr
"""


class EmbeddedKafkaError(RuntimeError):
    """The embedded Kafka could not be fetched, started or stopped."""


def fetch_broker_jars(cache_dir: Path, version: str = DEFAULT_KAFKA_VERSION) -> Path:
    """Resolve the broker's runtime jars into `cache_dir/kafka-<version>/lib` and return that dir.

    The second call is instant: a marker, written only after a complete fetch, short-circuits it.
    Everything is built in a temporary sibling dir and renamed into place in one step, so an
    interrupted fetch never leaves a half-filled dir that looks complete.
    """
    home = _kafka_home(cache_dir, version)
    if (home / COMPLETE_MARKER).is_file():
        return home / "lib"
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".kafka-{version}-", dir=cache_dir))
    try:
        _populate(staging, version)
        _publish(staging, home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched Kafka %s jars into %s in %.1fs", version, home, time.monotonic() - started)
    return home / "lib"


def _kafka_home(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"kafka-{version}"


def _populate(staging: Path, version: str) -> None:
    pom = staging / "pom.xml"
    pom.write_text(
        _POM_TEMPLATE.format(
            kafka=version, scala=SCALA_BINARY_VERSION, log4j=LOG4J_VERSION, slf4j=SLF4J_VERSION
        )
    )
    lib = staging / "lib"
    _run_maven(pom, lib)
    broker_jar = lib / f"kafka_{SCALA_BINARY_VERSION}-{version}.jar"
    if not broker_jar.is_file():
        raise EmbeddedKafkaError(f"Maven finished but {broker_jar.name} is missing from {lib}")
    (staging / BROKER_LOG4J).write_text(_BROKER_LOG4J_CONFIG)
    (staging / TOOLS_LOG4J).write_text(_TOOLS_LOG4J_CONFIG)
    # Last, so its presence proves everything above succeeded.
    (staging / COMPLETE_MARKER).write_text(f"kafka {version}\n")


def _run_maven(pom: Path, lib: Path) -> None:
    command = [
        "mvn",
        "-B",
        "-q",
        # Maven 3.8 colours its messages even in batch mode; they end up in our error text.
        "-Dstyle.color=never",
        "-f",
        str(pom),
        f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={lib}",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=FETCH_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise EmbeddedKafkaError("`mvn` is not installed; it is needed to fetch Kafka's jars") from exc
    except subprocess.TimeoutExpired as exc:
        raise EmbeddedKafkaError(f"fetching Kafka's jars took over {FETCH_TIMEOUT:.0f}s") from exc
    if result.returncode != 0:
        output = tail_text(result.stdout + result.stderr)
        raise EmbeddedKafkaError(f"fetching Kafka's jars failed (mvn exit {result.returncode}):\n{output}")


def _publish(staging: Path, home: Path) -> None:
    if home.exists() and not (home / COMPLETE_MARKER).is_file():
        # Left by something other than this function (which never publishes an incomplete dir).
        shutil.rmtree(home)
    try:
        staging.rename(home)
    except OSError:
        # A concurrent fetch won the race: theirs is complete, so ours is simply discarded.
        if not (home / COMPLETE_MARKER).is_file():
            raise


def tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a tool's or a log's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])
