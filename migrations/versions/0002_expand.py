"""Expand: managed (sealed) secrets, identity, providers, jobs, audit.

Legacy columns (secrets.value, mcp_servers.token, agents.model/secret_ref) are kept
and made nullable; the backfill moves them into sealed secrets and the contract
migration drops them once verification has passed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _ts(name: str, nullable: bool = False, default: bool = True) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        server_default=sa.func.now() if default else None,
        nullable=nullable,
    )


def upgrade() -> None:
    # Identity.
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=True),
        sa.Column("is_operator", sa.Boolean(), server_default=sa.false(), nullable=False),
        _ts("created_at"),
        _ts("disabled_at", nullable=True, default=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "memberships",
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("role IN ('admin', 'member')", name="ck_memberships_role"),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_memberships_org_id_orgs", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_memberships_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("org_id", "user_id", name="pk_memberships"),
    )
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True, default=False),
        _ts("last_used_at", nullable=True, default=False),
        _ts("revoked_at", nullable=True, default=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_api_tokens_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_hmac", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.JSON(), nullable=False),
        _ts("created_at"),
        _ts("expires_at", default=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_idempotency_keys_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_idempotency_keys"),
        sa.UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_id_key"),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])

    # Secrets: sealed columns beside the legacy plaintext, which becomes nullable.
    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.add_column(sa.Column("name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("description", sa.String(1000), nullable=True))
        batch.add_column(sa.Column("ciphertext", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("value_hint", sa.String(8), nullable=True))
        batch.add_column(sa.Column("allowed_hosts", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("updated_by", sa.String(64), nullable=True))
        batch.add_column(_ts("created_at"))
        batch.add_column(_ts("updated_at"))
        batch.add_column(_ts("rotated_at", nullable=True, default=False))
        batch.alter_column("value", existing_type=sa.Text(), nullable=True)
        batch.create_index("ix_secrets_key_id", ["key_id"])
        batch.create_unique_constraint("uq_secrets_org_id_id", ["org_id", "id"])
        batch.create_unique_constraint("uq_secrets_org_id_name", ["org_id", "name"])
        batch.create_check_constraint(
            "ck_secrets_sealed_or_legacy",
            "(ciphertext IS NOT NULL AND key_id IS NOT NULL AND name IS NOT NULL) OR value IS NOT NULL",
        )
        batch.create_check_constraint("ck_secrets_version_positive", "version >= 1")

    op.create_table(
        "providers",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("provider_type", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("secret_ref", sa.String(36), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("updated_by", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["org_id", "secret_ref"],
            ["secrets.org_id", "secrets.id"],
            name="fk_providers_org_id_secret_ref_secrets",
        ),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_providers_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_providers"),
        sa.UniqueConstraint("org_id", "id", name="uq_providers_org_id_id"),
        sa.UniqueConstraint("org_id", "name", name="uq_providers_org_id_name"),
    )
    op.create_index("ix_providers_org_id_secret_ref", "providers", ["org_id", "secret_ref"])

    with op.batch_alter_table("mcp_servers", recreate="auto") as batch:
        batch.add_column(sa.Column("transport", sa.String(32), server_default="streamable_http", nullable=False))
        batch.add_column(sa.Column("secret_ref", sa.String(36), nullable=True))
        batch.add_column(sa.Column("status", sa.String(16), server_default="pending", nullable=False))
        batch.add_column(sa.Column("status_error_code", sa.String(64), nullable=True))
        batch.add_column(sa.Column("status_error_message", sa.String(1000), nullable=True))
        batch.add_column(_ts("validated_at", nullable=True, default=False))
        batch.add_column(sa.Column("tool_count", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("updated_by", sa.String(64), nullable=True))
        batch.add_column(_ts("created_at"))
        batch.add_column(_ts("updated_at"))
        batch.alter_column("token", existing_type=sa.Text(), nullable=True)
        batch.create_index("ix_mcp_servers_org_id_secret_ref", ["org_id", "secret_ref"])
        batch.create_unique_constraint("uq_mcp_servers_org_id_id", ["org_id", "id"])
        batch.create_foreign_key(
            "fk_mcp_servers_org_id_secret_ref_secrets", "secrets", ["org_id", "secret_ref"], ["org_id", "id"]
        )

    with op.batch_alter_table("agents", recreate="auto") as batch:
        batch.add_column(sa.Column("provider_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("model_id", sa.String(200), nullable=True))
        batch.add_column(sa.Column("system_prompt", sa.Text(), nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("updated_by", sa.String(64), nullable=True))
        batch.add_column(_ts("created_at"))
        batch.add_column(_ts("updated_at"))
        batch.alter_column("model", existing_type=sa.String(200), nullable=True)
        batch.alter_column("secret_ref", existing_type=sa.String(36), nullable=True)
        batch.create_index("ix_agents_org_id_provider_id", ["org_id", "provider_id"])
        batch.create_unique_constraint("uq_agents_org_id_id", ["org_id", "id"])
        batch.create_foreign_key(
            "fk_agents_org_id_provider_id_providers", "providers", ["org_id", "provider_id"], ["org_id", "id"]
        )

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("progress_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.String(1000), nullable=True),
        sa.Column("resolved_secrets", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("started_at", nullable=True, default=False),
        _ts("finished_at", nullable=True, default=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_jobs_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_org_id_id", "jobs", ["org_id", "id"])
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])

    op.create_table(
        "audit_heads",
        sa.Column("chain", sa.String(36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("chain", name="pk_audit_heads"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("chain", sa.String(36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("org_id", sa.String(36), nullable=True),
        _ts("at", default=False),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name="fk_audit_events_org_id_orgs"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_events_chain_seq"),
    )
    op.create_index("ix_audit_events_org_id_target", "audit_events", ["org_id", "target_type", "target_id"])


def downgrade() -> None:
    bind = op.get_bind()
    # Sealed-only secrets have no legacy plaintext to fall back to: refuse rather than lose them.
    sealed_only = bind.execute(sa.text("SELECT COUNT(*) FROM secrets WHERE value IS NULL")).scalar_one()
    if sealed_only:
        raise RuntimeError(
            f"refusing to downgrade below 0002: {sealed_only} secret(s) exist only in sealed form "
            "and would be lost; delete them first or restore a backup"
        )
    for table, column in (("mcp_servers", "token"), ("agents", "model"), ("agents", "secret_ref")):
        sql = f"SELECT COUNT(*) FROM {table} WHERE {column} IS NULL"  # noqa: S608 - names from the tuple above
        missing = bind.execute(sa.text(sql)).scalar_one()
        if missing:
            raise RuntimeError(f"refusing to downgrade below 0002: {missing} row(s) of {table} have no legacy {column}")

    op.drop_index("ix_audit_events_org_id_target", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("audit_heads")
    op.drop_index("ix_jobs_status_created_at", table_name="jobs")
    op.drop_index("ix_jobs_org_id_id", table_name="jobs")
    op.drop_table("jobs")

    with op.batch_alter_table("agents", recreate="auto") as batch:
        batch.drop_constraint("fk_agents_org_id_provider_id_providers", type_="foreignkey")
        batch.drop_constraint("uq_agents_org_id_id", type_="unique")
        batch.drop_index("ix_agents_org_id_provider_id")
        batch.alter_column("secret_ref", existing_type=sa.String(36), nullable=False)
        batch.alter_column("model", existing_type=sa.String(200), nullable=False)
        for column in (
            "updated_at",
            "created_at",
            "updated_by",
            "created_by",
            "system_prompt",
            "model_id",
            "provider_id",
        ):
            batch.drop_column(column)

    with op.batch_alter_table("mcp_servers", recreate="auto") as batch:
        batch.drop_constraint("fk_mcp_servers_org_id_secret_ref_secrets", type_="foreignkey")
        batch.drop_constraint("uq_mcp_servers_org_id_id", type_="unique")
        batch.drop_index("ix_mcp_servers_org_id_secret_ref")
        batch.alter_column("token", existing_type=sa.Text(), nullable=False)
        for column in (
            "updated_at",
            "created_at",
            "updated_by",
            "created_by",
            "tool_count",
            "validated_at",
            "status_error_message",
            "status_error_code",
            "status",
            "secret_ref",
            "transport",
        ):
            batch.drop_column(column)

    op.drop_index("ix_providers_org_id_secret_ref", table_name="providers")
    op.drop_table("providers")

    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.drop_constraint("ck_secrets_version_positive", type_="check")
        batch.drop_constraint("ck_secrets_sealed_or_legacy", type_="check")
        batch.drop_constraint("uq_secrets_org_id_name", type_="unique")
        batch.drop_constraint("uq_secrets_org_id_id", type_="unique")
        batch.drop_index("ix_secrets_key_id")
        batch.alter_column("value", existing_type=sa.Text(), nullable=False)
        for column in (
            "rotated_at",
            "updated_at",
            "created_at",
            "updated_by",
            "created_by",
            "allowed_hosts",
            "value_hint",
            "version",
            "key_id",
            "ciphertext",
            "description",
            "name",
        ):
            batch.drop_column(column)

    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_api_tokens_user_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_index("ix_memberships_user_id", table_name="memberships")
    op.drop_table("memberships")
    op.drop_table("users")
