"""Counting jobs as they are written: created, finished (and how), and their time from creation to end.

Every change to a job goes through one process's committer (`conveyor.committer`), so the committer
counts what it has just committed, once, in the process that wrote it: the gateway counts the jobs it
created and the cancels, a worker the outcomes it recorded and the jobs its reaper failed. A change
the database did not take (a stale outcome, a replayed key) is not counted. It costs a few dictionary
look-ups per change, in memory, after the commit.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.changes import ChangeResult, NewJob, Outcome, Transition, Unit
from conveyor.lifecycle import JobState
from conveyor.metrics import jobs

# The final states, as the `outcome` label says them.
FINAL_OUTCOMES = {state: state.value for state in JobState if state.is_terminal}


def observe_committed(units: Sequence[Unit], results: Sequence[Sequence[ChangeResult]]) -> None:
    """Count the committed new jobs and final transitions of a batch (its units, and their results)."""
    series = jobs()
    for unit, unit_results in zip(units, results, strict=True):
        for change, result in zip(unit.changes, unit_results, strict=True):
            if result.outcome is not Outcome.WRITTEN or result.job is None:
                continue
            job = result.job
            if isinstance(change, NewJob):
                series.labelled(
                    series.submitted, job.type, str(job.priority), *series.tenant(job.tenant)
                ).inc()
            elif isinstance(change, Transition) and (outcome := FINAL_OUTCOMES.get(change.target)):
                series.labelled(series.finished, job.type, outcome, *series.tenant(job.tenant)).inc()
                if job.finished_at is not None:
                    seconds = (job.finished_at - job.created_at).total_seconds()
                    series.observe_end_to_end(job.tenant, max(0.0, seconds))
