"""The change log, the gallery's metadata, capture times and re-embed staging.

- reid_changes: one numbered row per add / delete; existing entries get one "add" each, in id order, so an
  upgraded gallery replays like a new one.
- reid_meta: the fingerprint of the weights that made the embeddings (set by the service on first start).
- reid_entries.captured_at (backfilled with created_at), embedding_next (a re-embed's staged template) and an
  index on content_sha256 (does another entry still use this crop file?).

Columns are only added (no table rebuild), so SQLite keeps AUTOINCREMENT and every row is kept as it was.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("reid_entries", sa.Column("captured_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("reid_entries", sa.Column("embedding_next", sa.LargeBinary(), nullable=True))
    op.execute("UPDATE reid_entries SET captured_at = created_at")
    op.create_index("ix_reid_entries_content_sha256", "reid_entries", ["content_sha256"])
    op.create_table(
        "reid_changes",
        sa.Column("seq", ID, primary_key=True, autoincrement=True),
        sa.Column("op", sa.String(16), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.execute("INSERT INTO reid_changes (op, entry_id, at) SELECT 'add', id, created_at FROM reid_entries ORDER BY id")
    op.create_table(
        "reid_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reid_meta")
    op.drop_table("reid_changes")
    op.drop_index("ix_reid_entries_content_sha256", "reid_entries")
    with op.batch_alter_table("reid_entries") as batch:
        batch.drop_column("embedding_next")
        batch.drop_column("captured_at")
