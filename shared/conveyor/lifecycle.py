"""The job lifecycle: its states and the transitions between them, defined once for every service.

Every write of a job's status goes through a conditional update built from `LEGAL_TRANSITIONS`
(see `conveyor.jobstore.transition`), so a stale or repeated message can never move a job backwards:
the update simply matches no row.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    # Waiting for its `run_at`; the scheduler queues it then. It is not on Kafka yet.
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """Finished: nothing more happens to the job on its own (a failed one may be retried by hand)."""
        return self in TERMINAL_STATES


# States a job waits in before it runs: what a tenant's queued-jobs limit counts.
WAITING_STATES: frozenset[JobState] = frozenset({JobState.SCHEDULED, JobState.QUEUED})
TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})

LEGAL_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.QUEUED, JobState.CANCELED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELED}),
    # RUNNING -> SCHEDULED is a retry after a backoff; RUNNING -> QUEUED one at once (a lost lease, or a
    # job handed back by a draining worker). Either way the next attempt has a higher attempt number.
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.SCHEDULED, JobState.QUEUED, JobState.CANCELED}
    ),
    JobState.SUCCEEDED: frozenset(),
    # The one way out of a terminal state: a client asks for the failed job to be retried
    # (`POST /v1/jobs/<id>/retry`). Its attempt numbers go on counting, so nothing is reused.
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.CANCELED: frozenset(),
}


class IllegalTransition(Exception):
    def __init__(self, current: JobState, target: JobState) -> None:
        super().__init__(f"a {current} job cannot become {target}")
        self.current = current
        self.target = target


def can_transition(current: JobState, target: JobState) -> bool:
    return target in LEGAL_TRANSITIONS[current]


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which a job may move to `target`."""
    return frozenset(state for state, targets in LEGAL_TRANSITIONS.items() if target in targets)
