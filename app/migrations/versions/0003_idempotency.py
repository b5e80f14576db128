"""Idempotency keys of ``POST /gallery``: the answer each key got, committed with its entries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reid_idempotency",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reid_idempotency_created_at", "reid_idempotency", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_reid_idempotency_created_at", "reid_idempotency")
    op.drop_table("reid_idempotency")
