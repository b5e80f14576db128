"""The gallery as the first release created it (Base.metadata.create_all): one table of entries.

A database made by that release has no alembic_version table; ``app.migrate`` stamps it at this revision
before upgrading, so its rows are kept.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "reid_entries",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("identity", sa.String(200), nullable=False),
        sa.Column("camera", sa.String(100), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("crop_path", sa.String(300), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_reid_entries_identity", "reid_entries", ["identity"])
    op.create_index("ix_reid_entries_camera", "reid_entries", ["camera"])


def downgrade() -> None:
    op.drop_table("reid_entries")
