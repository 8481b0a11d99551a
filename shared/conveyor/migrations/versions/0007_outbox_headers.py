"""trace contexts: the headers of an outbox row, and the trace of a job's submission

With tracing on (`conveyor.tracing`), an outbox row keeps the trace context of the span that staged
it (`outbox.headers`), so that a row the relay publishes after a restart, from the database, still
joins its trace and carries it on in the Kafka message's headers. A job keeps its submission's
(`jobs.trace_context`): the messages of changes no traced caller made (the scheduler queueing a due
job, the reaper requeueing a dead worker's) continue the job's trace. Both are NULL while tracing is
off, and nullable columns are added without rewriting the tables.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("headers", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trace_context")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("headers")
