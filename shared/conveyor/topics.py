"""Names of the Kafka topics the project uses. Every topic starts with the configured prefix."""

from __future__ import annotations

# Priority 1 is the most urgent; each level has a topic of its own so a backlog of one level
# never sits in front of another level's jobs.
HIGHEST_PRIORITY = 1
LOWEST_PRIORITY = 5
DEFAULT_PRIORITY = 3
PRIORITIES = range(HIGHEST_PRIORITY, LOWEST_PRIORITY + 1)


def job_topic(prefix: str, priority: int) -> str:
    return f"{prefix}.jobs.p{priority}"


def is_job_topic(topic: str) -> bool:
    """Whether `topic` is one of the job topics (`<prefix>.jobs.p1` ... `p5`), of any prefix."""
    head, _, level = topic.rpartition(".jobs.p")
    return bool(head) and level.isdigit() and int(level) in PRIORITIES


def job_topics(prefix: str) -> list[str]:
    return [job_topic(prefix, priority) for priority in PRIORITIES]


def job_key(job_id: str) -> str:
    """The Kafka key of a job message: the job's id, so that any tenant's jobs spread evenly over every
    partition of their priority topic, and so over every worker. (Fairness between tenants is the
    worker's pick among what it has fetched: `services.worker.intake`.) A job's messages, its retries
    included, all go to one partition."""
    return job_id


def events_topic(prefix: str) -> str:
    return f"{prefix}.events"


def dead_letter_topic(prefix: str) -> str:
    return f"{prefix}.dead-letter"


def all_topics(prefix: str) -> list[str]:
    return [*job_topics(prefix), events_topic(prefix), dead_letter_topic(prefix)]


def worker_group(prefix: str) -> str:
    """The workers' consumer group: one per deployment, so deployments can share a Kafka cluster."""
    return f"{prefix}-workers"
