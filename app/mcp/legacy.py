"""Where a server not yet backfilled finds its raw legacy token (until the contract migration).

The MCP code asks here and never reads a legacy column itself: the legacy package
(``app/backfill``) is the only code that knows them, and it is found through the one
registration point (app/extensions.py) as ``app.backfill.legacy``. After the contract
migration the package and its entry there go (docs/legacy.md): ``SOURCES`` is then empty and
every question here answers "no legacy token".
"""

from __future__ import annotations

from typing import Protocol, cast

from sqlalchemy.orm import Session

from app import extensions


class TokenSource(Protocol):
    def mcp_token(self, session: Session, org_id: str, server_id: str) -> str | None: ...

    def has_mcp_token(self, session: Session, org_id: str, server_id: str) -> bool: ...


# Every extension's ``legacy`` module answers these questions (app/extensions.py).
SOURCES = cast(tuple[TokenSource, ...], tuple(extensions.modules("legacy")))


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
