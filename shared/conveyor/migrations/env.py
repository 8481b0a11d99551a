"""Alembic environment: migrations run on a connection handed over by `conveyor.database`."""

from alembic import context

from conveyor.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `conveyor migrate`, which passes a database connection")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
