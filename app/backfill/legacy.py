"""The legacy columns (revision 0001), read and written only here, through SQLAlchemy Core.

The ORM models map the schema as it is after the contract migration, so no code path can
read a legacy field by accident. The backfill, the verify job and the deprecated MCP token
fallback use these lightweight table clauses instead, and ask :func:`present` first: after
the contract migration the columns are gone and every legacy read answers "nothing".
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

log = logging.getLogger("latchkey.legacy")

# Only the columns the legacy code paths touch (plus the ids they join on).
secrets = sa.table(
    "secrets",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("value", sa.Text),
    sa.column("name", sa.String),
    sa.column("ciphertext", sa.LargeBinary),
    sa.column("key_id", sa.String),
    sa.column("version", sa.Integer),
)
mcp_servers = sa.table(
    "mcp_servers",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("name", sa.String),
    sa.column("token", sa.Text),
    sa.column("secret_ref", sa.String),
)
agents = sa.table(
    "agents",
    sa.column("id", sa.String),
    sa.column("org_id", sa.String),
    sa.column("model", sa.String),
    sa.column("secret_ref", sa.String),
    sa.column("provider_id", sa.String),
    sa.column("model_id", sa.String),
)

_present: dict[str, bool] = {}
_lock = threading.Lock()


def _url_key(session: Session) -> str:
    return session.get_bind().engine.url.render_as_string(hide_password=True)


def present(session: Session, *, refresh: bool = False) -> bool:
    """Whether the legacy columns still exist (the contract migration has not run)."""
    key = _url_key(session)
    with _lock:
        known = None if refresh else _present.get(key)
    if known is not None:
        return known
    inspector = sa.inspect(session.connection())
    found = {c["name"] for c in inspector.get_columns("secrets")}
    value = "value" in found
    with _lock:
        _present[key] = value
    return value


def mcp_token(session: Session, org_id: str, server_id: str) -> str | None:
    """The raw legacy token of a server not yet backfilled; None once contracted.

    The read runs in a savepoint: a worker started before the contract migration finds
    the column gone, remembers that, and answers None without spoiling the transaction.
    """
    if not present(session):
        return None
    try:
        with session.begin_nested():
            return session.execute(
                sa.select(mcp_servers.c.token).where(mcp_servers.c.org_id == org_id, mcp_servers.c.id == server_id)
            ).scalar_one_or_none()
    except DBAPIError:
        if present(session, refresh=True):
            raise
        log.info("legacy columns are gone (contract migration applied); no legacy token fallback")
        return None


def has_mcp_token(session: Session, org_id: str, server_id: str) -> bool:
    """Whether a server not yet backfilled still carries a raw legacy token; False once contracted.

    For the web tier's permission checks: a ``token IS NOT NULL`` predicate, so the token itself
    is never selected (the web tier must not read a raw credential to learn that one exists).
    """
    if not present(session):
        return False
    try:
        with session.begin_nested():
            found = session.execute(
                sa.select(sa.literal(1))
                .select_from(mcp_servers)
                .where(mcp_servers.c.org_id == org_id, mcp_servers.c.id == server_id, mcp_servers.c.token.is_not(None))
            ).first()
            return found is not None
    except DBAPIError:
        if present(session, refresh=True):
            raise
        return False


def count(session: Session, table: Any, condition: Any, orgs: str | list[str] | None = None) -> int:
    """Rows of ``table`` matching ``condition`` (of one org, or of a list of orgs)."""
    stmt = sa.select(sa.func.count()).select_from(table).where(condition)
    if isinstance(orgs, str):
        stmt = stmt.where(table.c.org_id == orgs)
    elif orgs is not None:
        stmt = stmt.where(table.c.org_id.in_(orgs))
    return int(session.scalar(stmt) or 0)


def rows_by_org(session: Session, which: int, org_id: str | None = None) -> dict[str, int]:
    """Rows per org matching ``which`` (CARRYING, PENDING or DONE), all three kinds added up."""
    out: dict[str, int] = {}
    for conds in KINDS.values():
        table = conds[0]
        stmt = sa.select(table.c.org_id, sa.func.count()).where(conds[which]).group_by(table.c.org_id)
        if org_id is not None:
            stmt = stmt.where(table.c.org_id == org_id)
        for org, n in session.execute(stmt):
            out[org] = out.get(org, 0) + int(n)
    return out


def _counts(session: Session, which: int, org_id: str | None = None) -> dict[str, int]:
    if not present(session):
        return dict.fromkeys(KINDS, 0)
    return {kind: count(session, conds[0], conds[which], org_id) for kind, conds in KINDS.items()}


def pending_counts(session: Session, org_id: str | None = None) -> dict[str, int]:
    """Legacy rows not yet migrated, per kind (all zero once contracted)."""
    return _counts(session, PENDING, org_id)


def legacy_counts(session: Session) -> dict[str, int]:
    """Rows that carry legacy data at all (migrated or not), per kind."""
    return _counts(session, CARRYING)


# Which rows each backfill step migrates, and which it counts as already migrated -----------


def secret_pending() -> Any:
    return secrets.c.value.is_not(None) & secrets.c.ciphertext.is_(None)


def secret_done() -> Any:
    return secrets.c.value.is_not(None) & secrets.c.ciphertext.is_not(None)


def mcp_pending() -> Any:
    return mcp_servers.c.token.is_not(None) & mcp_servers.c.secret_ref.is_(None)


def mcp_done() -> Any:
    return mcp_servers.c.token.is_not(None) & mcp_servers.c.secret_ref.is_not(None)


def agent_pending() -> Any:
    return agents.c.model.is_not(None) & agents.c.secret_ref.is_not(None) & agents.c.provider_id.is_(None)


def agent_done() -> Any:
    return agents.c.model.is_not(None) & agents.c.secret_ref.is_not(None) & agents.c.provider_id.is_not(None)


# kind -> (table, rows carrying legacy data, pending, already migrated)
CARRYING, PENDING, DONE = 1, 2, 3
KINDS: dict[str, tuple[Any, Any, Any, Any]] = {
    "secrets": (secrets, secrets.c.value.is_not(None), secret_pending(), secret_done()),
    "mcp_servers": (mcp_servers, mcp_servers.c.token.is_not(None), mcp_pending(), mcp_done()),
    "agents": (
        agents,
        agents.c.model.is_not(None) | agents.c.secret_ref.is_not(None),
        agent_pending(),
        agent_done(),
    ),
}
