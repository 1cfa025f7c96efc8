"""Join the split-jobs expand step (0014) to the merged history (0013). No operations.

Revision ID: 0015
Revises: 0013, 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

revision = "0015"
down_revision = ("0013", "0014")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
