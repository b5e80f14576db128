"""Schema migrations with Alembic (scripts in app/migrations): applied by the service at start-up
(REID_MIGRATE_ON_START) or by ``reid-admin migrate``. Configured in code, so the scripts ship inside the package
and no alembic.ini has to be found at run time."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from app.db import MIGRATE_LOCK

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
FIRST_REVISION = "0001"  # the schema of the release before migrations (create_all)


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision; FIRST_REVISION for a gallery made before migrations, None for an empty one."""
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
        if revision is None and inspect(connection).has_table("reid_entries"):
            return FIRST_REVISION
        return revision


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision in place; (revision before, revision after)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})
        config = alembic_config(connection)
        before = MigrationContext.configure(connection).get_current_revision()
        if before is None and inspect(connection).has_table("reid_entries"):
            logger.info("a gallery from before schema migrations: stamping it at revision %s", FIRST_REVISION)
            command.stamp(config, FIRST_REVISION)
            before = FIRST_REVISION
        head = head_revision()
        if before != head:
            logger.info("migrating the database schema from %s to %s", before or "empty", head)
            command.upgrade(config, "head")
        return before, head
