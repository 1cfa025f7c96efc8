"""Join the header credentials table (0011, an expand step) with the contracted line (0010).

0011 branches from 0009 like the other expand steps, so ``latchkey db upgrade 0011`` takes every
table the code needs and stops before the contract (0006). No operations.

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
