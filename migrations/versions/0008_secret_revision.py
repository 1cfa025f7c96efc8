"""Secret revisions: a database counter bumped on every committed change of a secret.

The cache pointer is ``<version>:<revision>``, so its order never depends on a web host's
clock (it was ``updated_at`` before).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.drop_column("revision")
