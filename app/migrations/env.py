"""Alembic's environment: migrations run on the connection ``app.migrate`` hands over (never on a URL read
from an ini file), so the service, the operator command and the tests migrate the same way."""

from __future__ import annotations

from alembic import context

from app.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
