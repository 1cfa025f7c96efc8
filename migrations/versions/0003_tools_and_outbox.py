"""MCP tool lists and the cache-invalidation outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mcp_tools",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("mcp_server_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("input_schema", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "mcp_server_id"],
            ["mcp_servers.org_id", "mcp_servers.id"],
            name="fk_mcp_tools_org_id_mcp_server_id_mcp_servers",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mcp_tools"),
        sa.UniqueConstraint("mcp_server_id", "name", name="uq_mcp_tools_mcp_server_id_name"),
    )
    op.create_table(
        "cache_invalidations",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("secret_id", sa.String(36), nullable=False),
        sa.Column("pointer", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cache_invalidations"),
    )
    op.create_index("ix_cache_invalidations_created_at", "cache_invalidations", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_cache_invalidations_created_at", table_name="cache_invalidations")
    op.drop_table("cache_invalidations")
    op.drop_table("mcp_tools")
