import uuid

from conveyor.topics import TENANT_SPREAD, all_topics, job_key, job_topics, worker_group


def test_a_tenants_jobs_spread_over_a_few_keys_only() -> None:
    keys = {job_key("acme", str(uuid.uuid4())) for _ in range(500)}
    assert len(keys) == TENANT_SPREAD
    assert all(key.startswith("acme/") for key in keys)
    assert job_key("acme", "job-1") == job_key("acme", "job-1")


def test_topic_names_follow_the_prefix() -> None:
    assert job_topics("cv") == [f"cv.jobs.p{n}" for n in range(1, 6)]
    assert set(all_topics("cv")) == {*job_topics("cv"), "cv.events", "cv.dead-letter"}
    assert worker_group("cv") == "cv-workers"
