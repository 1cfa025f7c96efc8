"""Contract: drop the legacy columns once a verification has proven the backfill.

Drops ``secrets.value`` (legacy plaintext), ``mcp_servers.token`` (raw bearer tokens) and
the agents' legacy ``model`` / ``secret_ref``, and makes every secret sealed-only
(``name``, ``ciphertext`` and ``key_id`` NOT NULL).

Refuses, and changes nothing, while any row carries legacy data unless the latest
``backfill verify`` passed with zero unmigrated rows AND the legacy rows still number
what that verification checked (a row added or changed since must be verified again).
A database that never held legacy data (a fresh install) has nothing to prove.

Downgrade puts the columns back, empty: the plaintext is gone for good (restore a backup
taken before this step to get it back; see docs/migration.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = ("contract",)
depends_on = None

HINT = "see docs/migration.md"

_secrets = sa.table("secrets", sa.column("value"), sa.column("ciphertext"))
_servers = sa.table("mcp_servers", sa.column("token"), sa.column("secret_ref"))
_agents = sa.table("agents", sa.column("model"), sa.column("secret_ref"), sa.column("provider_id"))
_verifications = sa.table(
    "backfill_verifications",
    sa.column("id", sa.String),
    sa.column("passed", sa.Boolean),
    sa.column("unmigrated", sa.Integer),
    sa.column("legacy_rows", sa.JSON),
    sa.column("failures", sa.JSON),
    sa.column("finished_at", sa.DateTime(timezone=True)),
)


def _count(bind: sa.Connection, table: sa.TableClause, condition: sa.ColumnElement[bool]) -> int:
    return int(bind.execute(sa.select(sa.func.count()).select_from(table).where(condition)).scalar_one())


def _legacy_rows(bind: sa.Connection) -> dict[str, int]:
    return {
        "secrets": _count(bind, _secrets, _secrets.c.value.is_not(None)),
        "mcp_servers": _count(bind, _servers, _servers.c.token.is_not(None)),
        "agents": _count(bind, _agents, _agents.c.model.is_not(None) | _agents.c.secret_ref.is_not(None)),
    }


def _unmigrated(bind: sa.Connection) -> int:
    return (
        _count(bind, _secrets, _secrets.c.value.is_not(None) & _secrets.c.ciphertext.is_(None))
        + _count(bind, _servers, _servers.c.token.is_not(None) & _servers.c.secret_ref.is_(None))
        + _count(
            bind,
            _agents,
            _agents.c.model.is_not(None) & _agents.c.secret_ref.is_not(None) & _agents.c.provider_id.is_(None),
        )
    )


def check_gate(bind: sa.Connection) -> None:
    """Raise with the reason when the legacy columns may not be dropped yet."""
    legacy = _legacy_rows(bind)
    if not any(legacy.values()):
        return
    prefix = "refusing to contract (drop the legacy columns)"
    latest = bind.execute(
        sa.select(_verifications).order_by(_verifications.c.finished_at.desc(), _verifications.c.id.desc()).limit(1)
    ).first()
    if latest is None:
        raise RuntimeError(
            f"{prefix}: no backfill verification has run; run `latchkey backfill run`, "
            f"then `latchkey backfill verify` ({HINT})"
        )
    if not latest.passed:
        raise RuntimeError(
            f"{prefix}: the latest backfill verification ({latest.id}) failed with "
            f"{len(latest.failures or [])} failure(s) and {latest.unmigrated} unmigrated row(s); "
            f"see `latchkey backfill status`, fix them, and verify again ({HINT})"
        )
    unmigrated = _unmigrated(bind)
    if latest.unmigrated or unmigrated:
        raise RuntimeError(
            f"{prefix}: {unmigrated} legacy row(s) are not migrated; run `latchkey backfill run` "
            f"and `latchkey backfill verify` again ({HINT})"
        )
    verified = {k: int(v) for k, v in dict(latest.legacy_rows or {}).items()}
    if verified != legacy:
        raise RuntimeError(
            f"{prefix}: legacy rows changed since the latest verification ({latest.id}); "
            f"run `latchkey backfill verify` again ({HINT})"
        )


def upgrade() -> None:
    check_gate(op.get_bind())
    with op.batch_alter_table("agents", recreate="auto") as batch:
        batch.drop_column("secret_ref")
        batch.drop_column("model")
    with op.batch_alter_table("mcp_servers", recreate="auto") as batch:
        batch.drop_column("token")
    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.drop_constraint("ck_secrets_sealed_or_legacy", type_="check")
        batch.drop_column("value")
        batch.alter_column("name", existing_type=sa.String(128), nullable=False)
        batch.alter_column("ciphertext", existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column("key_id", existing_type=sa.String(64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("secrets", recreate="auto") as batch:
        batch.add_column(sa.Column("value", sa.Text(), nullable=True))
        batch.alter_column("name", existing_type=sa.String(128), nullable=True)
        batch.alter_column("ciphertext", existing_type=sa.LargeBinary(), nullable=True)
        batch.alter_column("key_id", existing_type=sa.String(64), nullable=True)
        batch.create_check_constraint(
            "ck_secrets_sealed_or_legacy",
            "(ciphertext IS NOT NULL AND key_id IS NOT NULL AND name IS NOT NULL) OR value IS NOT NULL",
        )
    with op.batch_alter_table("mcp_servers", recreate="auto") as batch:
        batch.add_column(sa.Column("token", sa.Text(), nullable=True))
    with op.batch_alter_table("agents", recreate="auto") as batch:
        batch.add_column(sa.Column("model", sa.String(200), nullable=True))
        batch.add_column(sa.Column("secret_ref", sa.String(36), nullable=True))
