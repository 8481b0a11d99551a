"""Names of the Kafka topics the project uses. Every topic starts with the configured prefix."""

from __future__ import annotations

import zlib

# Priority 1 is the most urgent; each level has a topic of its own so a backlog of one level
# never sits in front of another level's jobs.
HIGHEST_PRIORITY = 1
LOWEST_PRIORITY = 5
DEFAULT_PRIORITY = 3
PRIORITIES = range(HIGHEST_PRIORITY, LOWEST_PRIORITY + 1)
# How many keys (so at most how many partitions of a topic) one tenant's jobs spread over: few enough
# that one tenant's flood leaves other partitions, and the tenants behind them, alone; more than one,
# so a single busy tenant still keeps several workers busy.
TENANT_SPREAD = 4


def job_topic(prefix: str, priority: int) -> str:
    return f"{prefix}.jobs.p{priority}"


def job_topics(prefix: str) -> list[str]:
    return [job_topic(prefix, priority) for priority in PRIORITIES]


def job_key(tenant: str, job_id: str) -> str:
    """The Kafka key of a job message: the tenant and one of its TENANT_SPREAD shards."""
    return f"{tenant}/{zlib.crc32(job_id.encode()) % TENANT_SPREAD}"


def events_topic(prefix: str) -> str:
    return f"{prefix}.events"


def dead_letter_topic(prefix: str) -> str:
    return f"{prefix}.dead-letter"


def all_topics(prefix: str) -> list[str]:
    return [*job_topics(prefix), events_topic(prefix), dead_letter_topic(prefix)]


def worker_group(prefix: str) -> str:
    """The workers' consumer group: one per deployment, so deployments can share a Kafka cluster."""
    return f"{prefix}-workers"
