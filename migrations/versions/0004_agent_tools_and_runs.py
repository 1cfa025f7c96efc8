"""Agents' selected tools and agent runs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_tools",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("mcp_server_id", sa.String(36), nullable=False),
        sa.Column("tool_name", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "agent_id"],
            ["agents.org_id", "agents.id"],
            name="fk_agent_tools_org_id_agent_id_agents",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "mcp_server_id"],
            ["mcp_servers.org_id", "mcp_servers.id"],
            name="fk_agent_tools_org_id_mcp_server_id_mcp_servers",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_agent_tools"),
        sa.UniqueConstraint(
            "agent_id", "mcp_server_id", "tool_name", name="uq_agent_tools_agent_id_mcp_server_id_tool_name"
        ),
    )
    op.create_table(
        "agent_runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("agent_id", sa.String(36), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.String(1000), nullable=True),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id", "agent_id"],
            ["agents.org_id", "agents.id"],
            name="fk_agent_runs_org_id_agent_id_agents",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_agent_runs"),
        sa.UniqueConstraint("org_id", "id", name="uq_agent_runs_org_id_id"),
    )
    op.create_index("ix_agent_runs_org_id_agent_id", "agent_runs", ["org_id", "agent_id"])


def downgrade() -> None:
    op.drop_index("ix_agent_runs_org_id_agent_id", table_name="agent_runs")
    op.drop_table("agent_runs")
    op.drop_table("agent_tools")
