"""MCP connections: OAuth 2.1 servers, per-org and per-user connections, authorizations in progress.

* ``mcp_servers``: ``auth_type`` (``static`` for every existing server: its ``secret_ref`` and
  headers), ``connection_scope``, and an optional pre-registered OAuth client.
* ``secrets.kind``: ``managed`` for every existing secret; ``connection`` for the sealed tokens
  of a connection, which no API or page lists, reveals or binds.
* ``mcp_connections`` and ``oauth_flows`` (app/models/connections.py).

Expand-only, on the expand line (after 0011, before the contract): an installation still
mid-migration runs the code that needs these tables. 0013 joins the line to 0010.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("secrets") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), server_default="managed", nullable=False))
    with op.batch_alter_table("mcp_servers") as batch:
        batch.add_column(sa.Column("auth_type", sa.String(32), server_default="static", nullable=False))
        batch.add_column(sa.Column("connection_scope", sa.String(8), server_default="org", nullable=False))
        batch.add_column(sa.Column("oauth_client_id", sa.String(255), nullable=True))
        batch.add_column(sa.Column("oauth_client_secret_ref", sa.String(36), nullable=True))
        batch.add_column(sa.Column("oauth_client_auth", sa.String(32), nullable=True))
        batch.add_column(sa.Column("oauth_scopes", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            "fk_mcp_servers_org_id_oauth_client_secret_ref_secrets",
            "secrets",
            ["org_id", "oauth_client_secret_ref"],
            ["org_id", "id"],
        )
        batch.create_index("ix_mcp_servers_org_id_oauth_client_secret_ref", ["org_id", "oauth_client_secret_ref"])
    op.create_table(
        "mcp_connections",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("mcp_server_id", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("secret_id", sa.String(36), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("wanted_scopes", sa.JSON(), nullable=False),
        sa.Column("has_refresh_token", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.String(1000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id", "mcp_server_id"],
            ["mcp_servers.org_id", "mcp_servers.id"],
            name="fk_mcp_connections_org_id_mcp_server_id_mcp_servers",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["org_id", "secret_id"],
            ["secrets.org_id", "secrets.id"],
            name="fk_mcp_connections_org_id_secret_id_secrets",
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_mcp_connections_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_mcp_connections"),
        sa.UniqueConstraint("mcp_server_id", "subject", name="uq_mcp_connections_mcp_server_id_subject"),
        sa.UniqueConstraint("org_id", "id", name="uq_mcp_connections_org_id_id"),
    )
    op.create_index("ix_mcp_connections_user_id", "mcp_connections", ["user_id"])
    op.create_index("ix_mcp_connections_org_id_secret_id", "mcp_connections", ["org_id", "secret_id"])
    op.create_table(
        "oauth_flows",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("mcp_server_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state_hash", sa.String(64), nullable=True),
        sa.Column("sealed", sa.LargeBinary(), nullable=True),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("code_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("destination", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id", "mcp_server_id"],
            ["mcp_servers.org_id", "mcp_servers.id"],
            name="fk_oauth_flows_org_id_mcp_server_id_mcp_servers",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_oauth_flows_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_oauth_flows"),
        sa.UniqueConstraint("state_hash", name="uq_oauth_flows_state_hash"),
    )
    op.create_index("ix_oauth_flows_mcp_server_id", "oauth_flows", ["mcp_server_id"])
    op.create_index("ix_oauth_flows_user_id", "oauth_flows", ["user_id"])


def downgrade() -> None:
    op.drop_table("oauth_flows")
    op.drop_table("mcp_connections")
    with op.batch_alter_table("mcp_servers") as batch:
        batch.drop_index("ix_mcp_servers_org_id_oauth_client_secret_ref")
        batch.drop_constraint("fk_mcp_servers_org_id_oauth_client_secret_ref_secrets", type_="foreignkey")
        for column in (
            "oauth_scopes",
            "oauth_client_auth",
            "oauth_client_secret_ref",
            "oauth_client_id",
            "connection_scope",
            "auth_type",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("kind")
