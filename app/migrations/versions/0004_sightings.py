"""Sightings: crops enrolled without a name, each in a tracklet and grouped into a person (reid_people).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reid_people",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("merged_into", sa.BigInteger(), nullable=True),
        sa.Column("reviewed", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_reid_people_status", "reid_people", ["status"])
    op.create_table(
        "reid_people_apart",
        sa.Column("person_a", sa.BigInteger(), primary_key=True),
        sa.Column("person_b", sa.BigInteger(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # batch mode: SQLite adds the columns in place (nullable, no default), PostgreSQL with ALTER TABLE
    with op.batch_alter_table("reid_entries") as batch:
        batch.add_column(sa.Column("person_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("track", sa.String(200), nullable=True))
        batch.create_index("ix_reid_entries_person_id", ["person_id"])
        batch.create_index("ix_reid_entries_camera_track", ["camera", "track", "captured_at"])


def downgrade() -> None:
    with op.batch_alter_table("reid_entries") as batch:
        batch.drop_index("ix_reid_entries_camera_track")
        batch.drop_index("ix_reid_entries_person_id")
        batch.drop_column("track")
        batch.drop_column("person_id")
    op.drop_table("reid_people_apart")
    op.drop_index("ix_reid_people_status", "reid_people")
    op.drop_table("reid_people")
