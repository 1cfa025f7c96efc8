"""Job leases: a running job is held by one worker until its lease expires.

``claim`` takes a job that is ``queued``, or ``running`` with an expired lease, in one
conditional UPDATE; the worker renews ``lease_expires_at`` while it runs; beat re-queues
(or fails with ``worker_lost``) jobs whose lease ran out.

Revision ID: 0007
Revises: 0005 (an expand step: it applies before or after the contract, 0006)
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("leased_by", sa.String(200), nullable=True))
    op.create_index("ix_jobs_status_lease_expires_at", "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_status_lease_expires_at", table_name="jobs")
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.drop_column("leased_by")
        batch.drop_column("lease_expires_at")
