import uuid
from collections import Counter

from conveyor.topics import all_topics, is_job_topic, job_key, job_topics, worker_group


def test_a_tenants_jobs_spread_over_every_partition() -> None:
    """The key is the job's id: Kafka's partitioner (murmur2 of the key) spreads any one tenant's jobs
    over every partition, so every worker gets its share of them."""
    ids = [str(uuid.uuid4()) for _ in range(1200)]
    assert [job_key(job_id) for job_id in ids] == ids
    assert job_key("job-1") == job_key("job-1")
    partitions = Counter(murmur2_partition(job_key(job_id).encode(), 12) for job_id in ids)
    assert sorted(partitions) == list(range(12))
    assert all(60 <= count <= 140 for count in partitions.values()), partitions  # ~100 each


def murmur2_partition(key: bytes, partitions: int) -> int:
    """aiokafka's DefaultPartitioner for a keyed message."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_topic_names_follow_the_prefix() -> None:
    assert job_topics("cv") == [f"cv.jobs.p{n}" for n in range(1, 6)]
    assert set(all_topics("cv")) == {*job_topics("cv"), "cv.events", "cv.dead-letter"}
    assert worker_group("cv") == "cv-workers"


def test_job_topics_are_told_from_the_others_whatever_the_prefix() -> None:
    assert all(is_job_topic(topic) for topic in job_topics("a.b-c"))
    assert not any(is_job_topic(topic) for topic in ("a.events", "a.dead-letter", "a.jobs.p9", "jobs.p1"))
