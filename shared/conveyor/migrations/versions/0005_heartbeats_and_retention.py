"""worker heartbeats, the partition of an outbox row, an index for retention, counted hand-backs

One row per live worker, its heartbeat by the database's clock about once a second. The reaper gives a
dead worker's running jobs their next attempt a few seconds after its last heartbeat, instead of when
their leases run out; the lease stays the backstop for workers that write no heartbeat. The reaper
sends such a job to a partition it consumes itself (`outbox.partition`), so it need not wait for the
dead worker's partitions to move to a live worker.

Finished jobs are deleted after `CONVEYOR_JOB_RETENTION_S`, a batch at a time, oldest first: a partial
index on `finished_at` (only finished jobs have one) finds each batch without a scan.

`jobs.hand_backs` counts the attempts draining workers handed back unfinished: only the first few are
free, so a long job under a scale-in that keeps coming cannot restart forever.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker_id", sa.String(200), primary_key=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("partition", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("hand_backs", sa.Integer(), nullable=False, server_default="0"))
    op.create_index(
        "ix_jobs_finished_at", "jobs", ["finished_at"], sqlite_where=FINISHED, postgresql_where=FINISHED
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("hand_backs")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("partition")
    op.drop_table("worker_heartbeats")
