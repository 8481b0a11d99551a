"""partial indexes for the scheduler and the reaper

The scheduler looks for scheduled jobs by `run_at`, the reaper for running jobs by `lease_expires_at`.
Indexes on (status, run_at) and (status, lease_expires_at) held an entry for every job and had to be
updated at each state change; worse, SQLite (which keeps no statistics) would use them for any
`status = ...` condition, so a claim `WHERE id IN (...) AND status = 'queued'` walked every queued job
instead of looking the ids up. Partial indexes hold only the rows those two queries want, cost nothing
when a job is queued or finished, and cannot serve any other status.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEDULED = sa.text("status = 'scheduled'")
RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.drop_index("ix_jobs_status_run_at", "jobs")
    op.drop_index("ix_jobs_status_lease", "jobs")
    op.create_index(
        "ix_jobs_scheduled_run_at", "jobs", ["run_at"], sqlite_where=SCHEDULED, postgresql_where=SCHEDULED
    )
    op.create_index(
        "ix_jobs_running_lease", "jobs", ["lease_expires_at"], sqlite_where=RUNNING, postgresql_where=RUNNING
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_running_lease", "jobs")
    op.drop_index("ix_jobs_scheduled_run_at", "jobs")
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])
    op.create_index("ix_jobs_status_run_at", "jobs", ["status", "run_at"])
