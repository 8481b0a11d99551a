"""The gateway's per-tenant limits, without a server: the token bucket and the queue cap's answer.
(The cap's count is the write path's: `test_changes.py`.)"""

from __future__ import annotations

import pytest

from conveyor.problems import Problem
from conveyor.settings import Settings, TenantLimits
from conveyor.tokenbucket import TokenBucket
from services.gateway.limits import SubmissionLimiter, queue_full


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, updated=100.0)
    assert [bucket.take(now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(now=100.0) == pytest.approx(0.5)  # one token comes every 1/rate seconds
    assert bucket.take(now=100.5) == 0.0
    assert bucket.take(now=110.0) == 0.0  # refills, but never past its burst
    assert bucket.tokens == pytest.approx(2.0)


def test_the_limiter_answers_429_with_retry_after() -> None:
    limiter = SubmissionLimiter()
    limits = TenantLimits(submit_rate=0.25, submit_burst=1)
    limiter.admit("t", limits)
    with pytest.raises(Problem) as refused:
        limiter.admit("t", limits)
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "4"
    limiter.admit("another-tenant", limits)  # each tenant has its own bucket


def test_a_batch_takes_a_token_per_job() -> None:
    bucket = TokenBucket(rate=1.0, burst=10, updated=100.0)
    assert bucket.take(now=100.0, count=8) == 0.0
    assert bucket.take(now=100.0, count=3) == pytest.approx(1.0), "one token short: a second to wait"
    assert bucket.take(now=101.0, count=3) == 0.0


def test_the_queue_cap_answers_429_naming_the_limit() -> None:
    refused = queue_full(2, TenantLimits(max_queued=2))
    assert refused.status == 429
    assert refused.extensions["limit"] == "max_queued"
    assert int(refused.headers["Retry-After"]) > 0


def test_per_tenant_overrides_keep_the_defaults_they_do_not_name() -> None:
    settings = Settings(tenant_submit_rate=7, tenant_limits={"acme": {"max_queued": 5}})  # type: ignore[arg-type]
    assert settings.limits_for("acme") == TenantLimits(max_queued=5, submit_rate=7)
    assert settings.limits_for("someone").max_queued == settings.tenant_max_queued
