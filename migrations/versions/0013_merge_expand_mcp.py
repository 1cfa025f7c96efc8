"""Join the MCP expand steps (0011 header credentials, 0012 connections) to the merged history (0010).

Both are expand steps after 0009, so an installation still mid-migration (``latchkey db upgrade
0012`` stops before the contract) has every table the running code needs. No operations.

Revision ID: 0013
Revises: 0010, 0012
Create Date: 2026-12-01
"""

from __future__ import annotations

revision = "0013"
down_revision = ("0010", "0012")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
