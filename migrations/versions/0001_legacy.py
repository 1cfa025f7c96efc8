"""The legacy (pre-managed-secrets) schema.

Plaintext secret values, raw MCP bearer tokens, agents pointing straight at a
secret. This is where installations upgrading to managed secrets start from.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_orgs"),
        sa.UniqueConstraint("slug", name="uq_orgs_slug"),
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_secrets_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_secrets"),
    )
    op.create_table(
        "mcp_servers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_mcp_servers_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_mcp_servers"),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("secret_ref", sa.String(36), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_agents_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_agents"),
    )


def downgrade() -> None:
    op.drop_table("agents")
    op.drop_table("mcp_servers")
    op.drop_table("secrets")
    op.drop_table("orgs")
