"""The write path, on SQLite and PostgreSQL: fenced transitions, new jobs with their keys and quotas,
atomic units, and group commit (many callers, one transaction, each its own answer)."""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta

import pytest
from sqlalchemy import Connection, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from conveyor import changes
from conveyor.changes import (
    ChangeResult,
    IdempotencyClaim,
    NewJob,
    Outcome,
    Unit,
    write_changes,
)
from conveyor.committer import Committer
from conveyor.database import Database
from conveyor.eventlog import events_between
from conveyor.jobstore import count_waiting_jobs, load_job
from conveyor.lifecycle import IllegalTransition, JobState
from conveyor.models import JOBS, Job, JobEventRecord, JobRecord, OutboxMessage, utcnow
from conveyor.outbox import OUTBOX, OutboxRelay

from harness import write_now

PREFIX = "changes-test"
DAY_S = 24 * 3600.0


def new_job(tenant: str = "t", *, key: str | None = None, body: str = "b", **fields: object) -> NewJob:
    claim = IdempotencyClaim(key, body, DAY_S) if key else None
    defaults: dict[str, object] = {"type": "demo.echo", "payload": {"a": 1}, "priority": 3, "max_attempts": 2}
    return NewJob(tenant=tenant, idempotency=claim, **{**defaults, **fields})  # type: ignore[arg-type]


async def one(db: Database, change: changes.Change) -> ChangeResult:
    [[result]] = (await write_now(db, PREFIX, change)).results
    return result


async def job(db: Database, change: changes.Change) -> JobRecord:
    result = await one(db, change)
    assert result.written and result.job is not None, result
    return result.job


async def stored(db: Database, job_id: str) -> JobRecord:
    record = await db.read(functools.partial(load_job, job_id=job_id))
    assert record is not None
    return record


# --- fenced transitions ---------------------------------------------------------------------------


async def test_a_job_is_claimed_once(db: Database) -> None:
    queued = await job(db, new_job())
    first = await one(db, changes.claim(queued.id, "w1", lease_s=30))
    second = await one(db, changes.claim(queued.id, "w2", lease_s=30))
    assert first.job is not None and first.job.status == JobState.RUNNING and first.job.attempts == 1
    assert first.job.worker_id == "w1" and first.job.last_seq == 2
    assert second.outcome is Outcome.STALE and second.job is None


async def test_claims_of_one_batch_are_one_statement_each_claimed_once(db: Database) -> None:
    queued = [await job(db, new_job()) for _ in range(3)]
    ids = [record.id for record in queued]
    written = await write_now(db, PREFIX, *(changes.claim(job_id, "w1", 30) for job_id in [*ids, ids[0]]))
    outcomes = [result.outcome for result in written.results[0]]
    assert outcomes == [Outcome.WRITTEN] * 3 + [Outcome.STALE], "the repeat of a job in one batch is stale"
    assert [result.job.id for result in written.results[0][:3] if result.job] == ids, "answers in order"
    assert [row.topic for row in written.outbox] == [f"{PREFIX}.events"] * 3  # a `running` event each


async def test_outcome_of_a_fenced_off_attempt_is_rejected(db: Database) -> None:
    queued = await job(db, new_job())
    claimed = await job(db, changes.claim(queued.id, "w1", lease_s=30))
    requeued = await job(db, changes.fail_attempt(claimed, {"type": "LeaseExpired", "message": ""}))
    assert requeued.status == JobState.QUEUED
    again = await job(db, changes.claim(queued.id, "w2", lease_s=30))
    assert again.attempts == 2
    assert (await one(db, changes.complete(claimed, "late"))).outcome is Outcome.STALE
    assert (await one(db, changes.progress(queued.id, 1, 50.0, "late"))).outcome is Outcome.STALE
    done = await job(db, changes.complete(again, "ok"))
    assert done.status == JobState.SUCCEEDED and done.result == "ok"


async def test_state_never_goes_backwards(db: Database) -> None:
    queued = await job(db, new_job())
    claimed = await job(db, changes.claim(queued.id, "w1", lease_s=30))
    await job(db, changes.complete(claimed, None))
    assert (await one(db, changes.Transition(queued.id, JobState.QUEUED))).outcome is Outcome.STALE
    assert (await one(db, changes.Transition(queued.id, JobState.RUNNING))).outcome is Outcome.STALE
    assert (await one(db, changes.claim(queued.id, "w2", lease_s=30))).outcome is Outcome.STALE
    assert (await stored(db, queued.id)).status == JobState.SUCCEEDED


async def test_a_transition_from_an_illegal_source_state_is_refused_as_illegal(db: Database) -> None:
    queued = await job(db, new_job())
    illegal = changes.Transition(queued.id, JobState.SUCCEEDED, source=JobState.QUEUED)
    with pytest.raises(IllegalTransition) as refused:
        await one(db, illegal)
    assert (refused.value.current, refused.value.target) == (JobState.QUEUED, JobState.SUCCEEDED)
    assert (await stored(db, queued.id)).status is JobState.QUEUED, "nothing was written"


async def test_stored_statuses_are_job_states(db: Database) -> None:
    # The column reads as `JobState`, from Core statements (RETURNING and SELECT) alike, and stores
    # the state's value, as it always did.
    queued = await job(db, new_job())
    claimed = await job(db, changes.claim(queued.id, "w1", lease_s=30))
    reported = await job(db, changes.progress(queued.id, 1, 50.0, None))
    assert queued.status is JobState.QUEUED and claimed.status is reported.status is JobState.RUNNING
    assert (await stored(db, queued.id)).status is JobState.RUNNING
    done = await job(db, changes.complete(reported, None))
    assert done.status is JobState.SUCCEEDED
    async with db.reading() as session:
        orm_job = await session.get(Job, queued.id)
    assert orm_job is not None and orm_job.status is JobState.SUCCEEDED  # the ORM's column too

    def raw_status(connection: Connection) -> object:
        return connection.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": queued.id}).scalar()

    raw = await db.read(raw_status)
    assert raw == "succeeded" and type(raw) is str


async def test_last_attempt_failure_is_final(db: Database) -> None:
    queued = await job(db, new_job(max_attempts=1))
    claimed = await job(db, changes.claim(queued.id, "w1", lease_s=30))
    written = await write_now(db, PREFIX, changes.fail_attempt(claimed, {"type": "Boom", "message": "no"}))
    failed = written.results[0][0].job
    assert failed is not None and failed.status == JobState.FAILED and failed.finished_at is not None
    assert failed.error == {"type": "Boom", "message": "no"}
    assert [row.topic for row in written.outbox] == [f"{PREFIX}.events", f"{PREFIX}.dead-letter"]


async def test_only_the_first_hand_backs_are_free_then_the_job_waits_and_the_attempt_counts(
    db: Database,
) -> None:
    """A long job under a scale-in that keeps coming: each draining worker hands it back. The first
    MAX_FREE_HAND_BACKS cost no attempt and queue it at once; the next counts, and the job waits."""
    current = await job(db, new_job(max_attempts=2))
    for hand_back in range(1, changes.MAX_FREE_HAND_BACKS + 1):
        claimed = await job(db, changes.claim(current.id, f"w{hand_back}", lease_s=30))
        current = await job(db, changes.hand_back(claimed, f"w{hand_back}"))
        assert (current.status, current.hand_backs) == (JobState.QUEUED, hand_back)
        assert current.max_attempts == 2 + hand_back, "a free hand-back gives the attempt back"
    claimed = await job(db, changes.claim(current.id, "w9", lease_s=30))
    waiting = await job(db, changes.hand_back(claimed, "w9"))
    assert (waiting.status, waiting.hand_backs) == (JobState.SCHEDULED, changes.MAX_FREE_HAND_BACKS + 1)
    assert waiting.max_attempts == claimed.max_attempts, "this one counts"
    assert waiting.run_at is not None and waiting.error is not None
    assert waiting.run_at - waiting.updated_at >= timedelta(seconds=changes.HAND_BACK_WAIT_S - 1)
    assert waiting.error["type"] == changes.HANDED_BACK and "counts" in waiting.error["message"]


async def test_progress_bumps_the_event_sequence(db: Database) -> None:
    queued = await job(db, new_job())
    await job(db, changes.claim(queued.id, "w1", lease_s=30))
    first = await job(db, changes.progress(queued.id, 1, 10.0, "a"))
    assert first.last_seq == 3
    second = await job(db, changes.progress(queued.id, 1, 20.0, "b"))
    assert second.last_seq == 4
    assert (second.progress_percent, second.progress_message) == (20.0, "b")


async def test_a_tenant_scoped_change_names_why_it_did_not_apply(db: Database) -> None:
    queued = await job(db, new_job())
    other = await one(db, changes.cancel(queued.id, tenant="someone-else"))
    assert other.outcome is Outcome.NOT_FOUND and other.job is None, "another tenant's job is not there"
    canceled = await job(db, changes.cancel(queued.id, tenant="t"))
    again = await one(db, changes.cancel(queued.id, tenant="t"))
    assert canceled.status == JobState.CANCELED
    assert again.outcome is Outcome.STALE and again.job is not None and again.job.status == JobState.CANCELED


async def test_every_change_is_in_the_history_and_the_outbox_in_the_same_transaction(db: Database) -> None:
    queued = await job(db, new_job())
    claimed = await job(db, changes.claim(queued.id, "w1", 30))
    written = await write_now(
        db, PREFIX, changes.progress(queued.id, 1, 50.0, "half"), changes.complete(claimed, 7)
    )
    history = await db.read(
        functools.partial(events_between, job_id=queued.id, after_seq=0, upto_seq=4, tenant="t")
    )
    assert history is not None and [(e.seq, e.type, e.status) for e in history] == [
        (1, "state", "queued"),
        (2, "state", "running"),
        (3, "progress", "running"),
        (4, "state", "succeeded"),
    ]
    # The outbox holds the very text the history holds: each event serialized once.
    assert [row.value.decode() for row in written.outbox] == [history[2].as_json(), history[3].as_json()]


# --- new jobs: idempotency keys, quotas, atomic units ------------------------------------------------


async def test_a_batch_with_a_key_conflict_an_over_quota_item_and_a_good_item_gets_three_answers(
    db: Database,
) -> None:
    first = await job(db, new_job("t", key="k", body="one", max_queued=2))
    written = await write_now(db, PREFIX)  # nothing: an empty unit writes nothing
    assert written.outbox == []
    units = [
        Unit([new_job("t", key="k", body="two", max_queued=2)]),  # the key, with another body
        Unit([new_job("t", max_queued=2)]),  # the second waiting job: room for it
        Unit([new_job("t", max_queued=2)]),  # a third: over the limit of 2
        Unit([new_job("t", key="k", body="one", max_queued=2)]),  # the first request again
    ]
    result = await db.write(functools.partial(write_changes, units=units, prefix=PREFIX))
    reused, good, over, replayed = (answers[0] for answers in result.results)
    assert reused.outcome is Outcome.KEY_REUSED
    assert good.outcome is Outcome.WRITTEN and good.job is not None
    assert over.outcome is Outcome.OVER_QUOTA and over.waiting == 2
    assert replayed.outcome is Outcome.REPLAYED and replayed.job is not None and replayed.job.id == first.id
    assert await db.read(functools.partial(count_waiting_jobs, tenant="t")) == 2


async def test_the_queue_cap_counts_jobs_waiting_to_run_per_tenant(db: Database) -> None:
    running = await job(db, new_job("t", max_queued=1))
    assert (await one(db, new_job("t", max_queued=1))).outcome is Outcome.OVER_QUOTA
    assert (await one(db, new_job("other", max_queued=1))).written, "each tenant has its own room"
    await job(db, changes.claim(running.id, "w1", 30))  # running: no longer waiting
    assert (await one(db, new_job("t", max_queued=1))).written
    scheduled = await one(db, new_job("t", max_queued=2, run_at=utcnow().replace(year=2099)))
    assert scheduled.job is not None and scheduled.job.status == JobState.SCHEDULED, "scheduled jobs wait too"
    assert (await one(db, new_job("t", max_queued=2))).outcome is Outcome.OVER_QUOTA


async def test_the_same_key_twice_in_one_batch_creates_one_job(db: Database) -> None:
    written = await write_now(
        db, PREFIX, new_job(key="k"), new_job(key="k"), new_job(key="k", body="other"), new_job(key="k2")
    )
    same, again, other, different = written.results[0]
    assert same.written and again.outcome is Outcome.REPLAYED and other.outcome is Outcome.KEY_REUSED
    assert same.job is not None and again.job is not None and same.job.id == again.job.id
    assert different.written


async def test_an_expired_key_can_be_used_again(db: Database) -> None:
    expired = NewJob(tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1,
                     idempotency=IdempotencyClaim("old", "one", window_s=0.0))  # fmt: skip
    first = await job(db, expired)
    again = await job(db, new_job(key="old", body="two"))
    assert again.id != first.id, "the expired record was dropped, and the key recorded anew"
    assert (await one(db, new_job(key="old", body="two"))).outcome is Outcome.REPLAYED


async def test_an_atomic_unit_is_created_whole_or_not_at_all(db: Database) -> None:
    await job(db, new_job("t", key="used", body="one"))
    refused = await write_now(
        db, PREFIX, new_job("t", max_queued=10), new_job("t", key="used", body="two"), atomic=True
    )
    assert [r.outcome for r in refused.results[0]] == [Outcome.ABANDONED, Outcome.KEY_REUSED]
    assert refused.outbox == []
    over = await write_now(db, PREFIX, *(new_job("t", max_queued=3) for _ in range(3)), atomic=True)
    # The item past the limit is named; the rest of the unit is not written either.
    assert [r.outcome for r in over.results[0]] == [Outcome.ABANDONED, Outcome.ABANDONED, Outcome.OVER_QUOTA]
    assert await db.read(functools.partial(count_waiting_jobs, tenant="t")) == 1
    accepted = await write_now(db, PREFIX, new_job("t", key="used", body="one"), new_job("t"), atomic=True)
    assert [r.outcome for r in accepted.results[0]] == [Outcome.REPLAYED, Outcome.WRITTEN]


# --- group commit ----------------------------------------------------------------------------------


def idle_relay(db: Database) -> OutboxRelay:
    """A relay that is never started, so what it is handed stays in the outbox, to be looked at (this
    module checks the write path; test_outbox and the stack's tests check what reaches Kafka)."""
    return OutboxRelay(db, "127.0.0.1:1")


async def outbox_keys(db: Database) -> list[str]:
    return await db.read(lambda c: list(c.execute(select(OUTBOX.c.key).order_by(OUTBOX.c.id)).scalars()))


async def test_concurrent_callers_share_one_transaction_and_each_gets_its_own_answer(db: Database) -> None:
    await job(db, new_job("t", key="k", body="one"))
    staged_before = len(await outbox_keys(db))
    committer = Committer(db, idle_relay(db), PREFIX)
    await committer.start()
    try:
        answers = [
            committer.submit([new_job("t", key="k", body="two", max_queued=2)]),
            committer.submit([new_job("t", max_queued=2)]),
            committer.submit([new_job("t", max_queued=2)]),
        ]
        reused, good, over = [result for [result] in await asyncio.gather(*answers)]
    finally:
        await committer.stop()
    assert (committer.batches, committer.changes) == (1, 3), "one transaction for the three callers"
    assert reused.outcome is Outcome.KEY_REUSED
    assert good.written and good.job is not None
    assert over.outcome is Outcome.OVER_QUOTA
    staged = (await outbox_keys(db))[staged_before:]
    assert staged == [good.job.id, good.job.id], "its event and its job message, nothing for the others"


async def test_a_batch_refused_for_one_item_is_written_again_without_it(db: Database) -> None:
    taken = await job(db, new_job())
    committer = Committer(db, idle_relay(db), PREFIX)
    await committer.start()
    try:
        answers = [
            committer.submit([new_job()]),
            committer.submit(
                [NewJob(tenant="t", type="demo.echo", payload={}, priority=3, max_attempts=1, id=taken.id)]
            ),
            committer.submit([new_job()]),
        ]
        outcomes = await asyncio.gather(*answers, return_exceptions=True)
    finally:
        await committer.stop()
    first, duplicate, last = outcomes
    assert isinstance(duplicate, IntegrityError), "the job id is taken: only its caller hears of it"
    assert isinstance(first, list) and first[0].written
    assert isinstance(last, list) and last[0].written
    count = await db.read(lambda c: c.execute(select(func.count()).select_from(JOBS)).scalar())
    assert count == 3


# On SQLite writers take turns, so two transactions never hold one key at once.
@pytest.mark.parametrize("database_kind", ["postgresql"], indirect=True)
async def test_a_key_recorded_by_a_concurrent_transaction_answers_with_its_job(db: Database) -> None:
    winner = new_job(key="raced", body="same")
    assert winner.idempotency is not None
    # Another process's transaction has recorded the key and not committed yet.
    async with db.engine.connect() as other:
        await other.execute(
            insert(JOBS).values(
                id=winner.id, tenant="t", type="demo.echo", status="queued", priority=3, payload={},
                attempts=0, max_attempts=1, labels={}, last_seq=1, created_at=utcnow(), updated_at=utcnow(),
            )
        )  # fmt: skip
        await other.execute(
            text(
                "INSERT INTO idempotency_keys (tenant, key, fingerprint, job_id, created_at, expires_at)"
                " VALUES ('t', 'raced', 'same', :id, now(), now() + interval '1 day')"
            ),
            {"id": winner.id},
        )
        loser = asyncio.create_task(one(db, new_job(key="raced", body="same")))
        await asyncio.sleep(0.5)
        assert not loser.done(), "the second insert of the key waits for the first transaction"
        await other.commit()
    result = await loser
    assert result.outcome is Outcome.REPLAYED and result.job is not None and result.job.id == winner.id
    assert await db.read(lambda c: c.execute(select(func.count()).select_from(JOBS)).scalar()) == 1


async def test_nothing_of_a_transaction_that_failed_is_left_behind(db: Database) -> None:
    def fail_after_writing(connection: Connection) -> None:
        write_changes(connection, [Unit([new_job()])], PREFIX)
        raise RuntimeError("the process dies before committing")

    with pytest.raises(RuntimeError):
        await db.write(fail_after_writing)

    def counts(connection: Connection) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            connection.execute(select(func.count()).select_from(table)).scalar()
            for table in (JOBS, JobEventRecord.__table__, OutboxMessage.__table__)
        )

    assert await db.read(counts) == (0, 0, 0)
