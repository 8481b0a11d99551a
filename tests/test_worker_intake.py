"""The intake refuses a record of a topic that is no priority level (the consumer reads only those)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from conveyor.events import JobMessage
from services.worker.intake import Intake, Pending


def test_a_record_of_another_topic_is_refused() -> None:
    message = JobMessage(job_id="job-1", tenant="t", type="demo.noop", priority=1, attempt=1)
    with pytest.raises(ValueError, match="no priority topic"):
        Intake("pre").add(Pending(TopicPartition("pre.events", 0), 0, message))
