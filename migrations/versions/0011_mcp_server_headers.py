"""MCP server header credentials: headers whose values are templates over secrets (issue #12).

An expand step: a new table, nothing existing changes (a server without headers behaves as
before). Like 0007-0009 it branches from the expand line (0009), not from the contract, since the
running code needs it on an installation still mid-migration; 0012 joins it to 0010.

Names are unique per server case-insensitively: ``name_key`` holds the lower-cased
name under a unique constraint (an index on ``lower(name)`` cannot be reflected, so
``alembic check`` could not compare it).

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mcp_server_headers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("mcp_server_id", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("name_key", sa.String(128), nullable=False),
        sa.Column("template", sa.String(1000), nullable=False),
        sa.Column("secret_ref", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "mcp_server_id"],
            ["mcp_servers.org_id", "mcp_servers.id"],
            name="fk_mcp_server_headers_org_id_mcp_server_id_mcp_servers",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "secret_ref"],
            ["secrets.org_id", "secrets.id"],
            name="fk_mcp_server_headers_org_id_secret_ref_secrets",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mcp_server_headers"),
        sa.UniqueConstraint("mcp_server_id", "name_key", name="uq_mcp_server_headers_mcp_server_id_name_key"),
    )
    op.create_index("ix_mcp_server_headers_org_id_secret_ref", "mcp_server_headers", ["org_id", "secret_ref"])


def downgrade() -> None:
    op.drop_index("ix_mcp_server_headers_org_id_secret_ref", table_name="mcp_server_headers")
    op.drop_table("mcp_server_headers")
