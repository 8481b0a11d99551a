"""The collector's tuning: what a service holds at its start is frozen, the youngest generation is
collected less often, and a service with a growing heap waits longer between full collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from conveyor import collector


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Put back this process's thresholds and unfreeze what a test froze."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("gc_state")
def test_a_started_service_keeps_what_it_holds_out_of_collections_and_pythons_old_threshold() -> None:
    _, middle, old = gc.get_threshold()
    held: list[object] = [{"a": []}]
    collector.started()
    # Frozen: in no generation a collection walks (`get_objects` lists those), yet alive and tracked.
    assert gc.is_tracked(held)
    assert not any(found is held for found in gc.get_objects())
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, middle, old)


@pytest.mark.usefixtures("gc_state")
def test_a_service_with_a_growing_heap_waits_longer_between_full_collections() -> None:
    _, middle, _ = gc.get_threshold()
    collector.started(old_threshold=collector.GROWING_HEAP_OLD_THRESHOLD)
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, middle, collector.GROWING_HEAP_OLD_THRESHOLD)
