"""Split jobs: ``jobs.parent_id``, so a backfill, verify or reseal runs as parts every worker takes.

A part is an ordinary job (kind ``jobs.run_part``) with its own lease, attempts and result;
``parent_id`` names the job it belongs to (app/tasks/split.py).

Expand-only, on the expand line (after 0012, before the contract): the split backfill runs on
a database that still holds legacy rows. 0015 joins the line to 0013.

Revision ID: 0014
Revises: 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.add_column(sa.Column("parent_id", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_jobs_parent_id_jobs", "jobs", ["parent_id"], ["id"])
    op.create_index("ix_jobs_parent_id", "jobs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent_id", table_name="jobs")
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.drop_constraint("fk_jobs_parent_id_jobs", type_="foreignkey")
        batch.drop_column("parent_id")
