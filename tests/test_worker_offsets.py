"""The offset tracker: a partition's commit never passes a job that has not reached a recorded state."""

from __future__ import annotations

from aiokafka import TopicPartition

from services.worker.offsets import OffsetTracker

P0 = TopicPartition("jobs", 0)
P1 = TopicPartition("jobs", 1)


def test_nothing_seen_is_nothing_to_commit() -> None:
    assert OffsetTracker().committable() == {}


def test_the_commit_stops_at_the_oldest_job_in_flight() -> None:
    offsets = OffsetTracker()
    for offset in (0, 1, 2):
        offsets.started(P0, offset)
    offsets.finished(P0, 1)
    offsets.finished(P0, 2)
    assert offsets.committable() == {}, "offset 0 still runs"
    offsets.finished(P0, 0)
    assert offsets.committable() == {P0: 3}, "one past the highest seen once nothing is in flight"


def test_jobs_finishing_out_of_order_move_the_commit_to_the_next_in_flight() -> None:
    offsets = OffsetTracker()
    for offset in (5, 6, 7):
        offsets.started(P0, offset)
    offsets.finished(P0, 5)
    assert offsets.committable() == {P0: 6}
    assert offsets.in_flight == 2


def test_a_committed_offset_is_not_committed_again() -> None:
    offsets = OffsetTracker()
    offsets.started(P0, 0)
    offsets.finished(P0, 0)
    offsets.mark_committed(offsets.committable())
    assert offsets.committable() == {}
    offsets.started(P0, 1)
    offsets.finished(P0, 1)
    assert offsets.committable() == {P0: 2}


def test_partitions_are_tracked_apart_and_can_be_asked_for_alone() -> None:
    offsets = OffsetTracker()
    offsets.started(P0, 0)
    offsets.started(P1, 10)
    offsets.finished(P0, 0)
    offsets.finished(P1, 10)
    assert offsets.committable() == {P0: 1, P1: 11}
    assert offsets.committable({P1}) == {P1: 11}
    assert offsets.partitions == {P0, P1}


def test_a_forgotten_partition_is_no_longer_committed() -> None:
    offsets = OffsetTracker()
    offsets.started(P0, 0)
    offsets.started(P1, 0)
    offsets.forget({P0})
    offsets.finished(P0, 0)  # a job of a partition given away may still end here: nothing to do
    offsets.finished(P1, 0)
    assert offsets.committable() == {P1: 1}
    assert offsets.partitions == {P1}
    assert offsets.in_flight == 0
