"""Join the two lines of history: the contract (0006) and the expand steps after it (0007-0009).

Schema additions that the running code needs (job leases, secret revisions, sessions and
invitations) branch from 0005, not from the contract, so an installation still mid-migration
(expanded, legacy data not yet backfilled and verified) can take them without the contract:
``latchkey db upgrade 0009`` applies every expand step and stops before 0006. An installation
that already ran the contract upgrades to head through 0007-0009 and this merge. No operations.

Revision ID: 0010
Revises: 0006, 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

revision = "0010"
down_revision = ("0006", "0009")
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
