"""where each job's latest job message landed on Kafka

The outbox relay records the partition and offset the broker acknowledged for each job message, in the
transaction that deletes its outbox row. The workers' sweep compares them with the group's committed
offsets and the partitions' log start: a queued job whose message was consumed without a claim, or
deleted, is published again.

A table of its own rather than two columns of `jobs`: the relay records a position just after the
message went out, which is when a worker claims the job; on PostgreSQL the relay's update of the `jobs`
row waited on the claim's row lock (and the claim on it), which halved the stack's throughput. Only
the relays write this table, and retention deletes its rows with their jobs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_message_positions",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_message_positions")
