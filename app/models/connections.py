"""MCP connections: the OAuth tokens an org or a user holds for a server, and authorizations in progress."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    String,
    UniqueConstraint,
    false,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id
from app.models.status import ConnectionStatus, FlowStatus, status_type

if TYPE_CHECKING:
    from app.models.resources import McpServer

# The subject of an org-wide connection; a user's is ``user:<user id>``.
ORG_SUBJECT = "org"


def user_subject(user_id: str) -> str:
    return f"user:{user_id}"


def per_user(server: McpServer) -> bool:
    """Whether each member connects their own account to ``server`` (else one connection serves the org)."""
    return server.auth_type == "oauth" and server.connection_scope == "user"


def subject_of(server: McpServer, user_id: str | None) -> str | None:
    """Whose connection a call to ``server`` on behalf of ``user_id`` uses: the org's, or (per-user
    servers) the user's own; None when a per-user server is called without a user."""
    if per_user(server):
        return user_subject(user_id) if user_id else None
    return ORG_SUBJECT


class McpConnection(Base):
    """Who may call an OAuth-protected MCP server: the org (one shared connection) or one user.

    The tokens are never here: ``secret_id`` names a secret of kind ``connection`` whose sealed
    value holds them (bound inside the seal to this org, server and subject), opened by workers only.
    """

    __tablename__ = "mcp_connections"
    __table_args__ = (
        UniqueConstraint("mcp_server_id", "subject"),
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id", "mcp_server_id"], ["mcp_servers.org_id", "mcp_servers.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["org_id", "secret_id"], ["secrets.org_id", "secrets.id"]),
        Index("ix_mcp_connections_user_id", "user_id"),
        Index("ix_mcp_connections_org_id_secret_id", "org_id", "secret_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    mcp_server_id: Mapped[str] = mapped_column(String(36))
    # "org" or "user:<user id>": one connection per (server, subject).
    subject: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    status: Mapped[ConnectionStatus] = mapped_column(status_type(ConnectionStatus, 16))
    secret_id: Mapped[str | None] = mapped_column(String(36))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Scopes a server asked for (403 insufficient_scope): the next connect asks for these too.
    wanted_scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    has_refresh_token: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class OAuthFlow(Base):
    """One authorization: prepared by a worker, completed once, within minutes, by the user who began it.

    The web tier keeps only the SHA-256 of ``state``. ``sealed`` (the PKCE verifier, the client
    and the endpoints) is sealed by a worker, ``code_sealed`` by the web tier; both are sealed
    to the workers' key, so only a worker can open either, and both are cleared when the flow ends.
    """

    __tablename__ = "oauth_flows"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "mcp_server_id"], ["mcp_servers.org_id", "mcp_servers.id"], ondelete="CASCADE"),
        Index("ix_oauth_flows_mcp_server_id", "mcp_server_id"),
        Index("ix_oauth_flows_user_id", "user_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    mcp_server_id: Mapped[str] = mapped_column(String(36))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    subject: Mapped[str] = mapped_column(String(64))
    status: Mapped[FlowStatus] = mapped_column(status_type(FlowStatus, 16))
    state_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    key_id: Mapped[str | None] = mapped_column(String(64))
    code_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # The destination the flow was prepared for (url, transport): an exchange for a server that
    # was re-pointed since ends stale.
    destination: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job_id: Mapped[str | None] = mapped_column(String(36))
    error_code: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
