"""Join the MCP connections expand step (0011) to the merged history (0010). No operations.

Revision ID: 0012
Revises: 0010, 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

revision = "0012"
down_revision = ("0010", "0011")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
