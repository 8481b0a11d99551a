from conveyor.lifecycle import LEGAL_TRANSITIONS, TERMINAL_STATES, JobState, can_transition, sources_of


def test_terminal_states_have_no_way_out_but_a_retry_of_a_failed_job() -> None:
    for state in TERMINAL_STATES:
        assert state.is_terminal
    assert LEGAL_TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    assert LEGAL_TRANSITIONS[JobState.CANCELED] == frozenset()
    assert LEGAL_TRANSITIONS[JobState.FAILED] == {JobState.QUEUED}


def test_every_state_is_reachable_from_scheduled() -> None:
    reached, frontier = {JobState.SCHEDULED}, [JobState.SCHEDULED]
    while frontier:
        for target in LEGAL_TRANSITIONS[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(JobState)


def test_running_is_only_entered_from_queued() -> None:
    assert sources_of(JobState.RUNNING) == {JobState.QUEUED}
    assert not can_transition(JobState.SUCCEEDED, JobState.RUNNING)
    assert can_transition(JobState.RUNNING, JobState.QUEUED)  # a retry


def test_a_scheduled_job_is_queued_or_canceled_and_only_a_failed_attempt_schedules_again() -> None:
    assert LEGAL_TRANSITIONS[JobState.SCHEDULED] == {JobState.QUEUED, JobState.CANCELED}
    assert sources_of(JobState.SCHEDULED) == {JobState.RUNNING}  # a retry after its backoff
    assert sources_of(JobState.CANCELED) == {JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING}
