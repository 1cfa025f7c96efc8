"""Backfill verification records (what the contract migration checks).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backfill_verifications",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("unmigrated", sa.Integer(), nullable=False),
        sa.Column("legacy_rows", sa.JSON(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("failures", sa.JSON(), nullable=False),
        sa.Column("cache_check", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_backfill_verifications"),
    )
    op.create_index("ix_backfill_verifications_finished_at", "backfill_verifications", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_backfill_verifications_finished_at", table_name="backfill_verifications")
    op.drop_table("backfill_verifications")
