"""Where a server not yet backfilled finds its raw legacy token (until the contract migration).

The MCP code asks here and never reads a legacy column itself: the legacy package
(``app/backfill``) is the only code that knows them, and this module is the one place that
registers it. After the contract migration, delete ``app/backfill/`` and empty ``SOURCES``
(docs/legacy.md): every question here then answers "no legacy token".
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from app.backfill import legacy as backfill_legacy


class TokenSource(Protocol):
    def mcp_token(self, session: Session, org_id: str, server_id: str) -> str | None: ...

    def has_mcp_token(self, session: Session, org_id: str, server_id: str) -> bool: ...


# The registration: the one line outside the legacy package that names it.
SOURCES: tuple[TokenSource, ...] = (backfill_legacy,)


def token(session: Session, org_id: str, server_id: str) -> str | None:
    """The raw legacy token of a server not yet backfilled; None when there is none."""
    for source in SOURCES:
        found = source.mcp_token(session, org_id, server_id)
        if found is not None:
            return found
    return None


def has_token(session: Session, org_id: str, server_id: str) -> bool:
    """Whether a server not yet backfilled still carries a raw legacy token (never selecting it)."""
    return any(source.has_mcp_token(session, org_id, server_id) for source in SOURCES)
