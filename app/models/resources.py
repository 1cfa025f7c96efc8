"""Resources that reference secrets: providers, MCP servers, agents."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, ForeignKeyConstraint, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, UTCDateTime, new_id
from app.models.status import JobStatus, McpServerStatus, status_type


class Provider(Base):
    __tablename__ = "providers"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id", "secret_ref"], ["secrets.org_id", "secrets.id"]),
        Index("ix_providers_org_id_secret_ref", "org_id", "secret_ref"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    name: Mapped[str] = mapped_column(String(128))
    provider_type: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    secret_ref: Mapped[str] = mapped_column(String(36))
    created_by: Mapped[str | None] = mapped_column(String(64))
    updated_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


class McpServer(Base):
    __tablename__ = "mcp_servers"
    __table_args__ = (
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id", "secret_ref"], ["secrets.org_id", "secrets.id"]),
        Index("ix_mcp_servers_org_id_secret_ref", "org_id", "secret_ref"),
        ForeignKeyConstraint(["org_id", "oauth_client_secret_ref"], ["secrets.org_id", "secrets.id"]),
        Index("ix_mcp_servers_org_id_oauth_client_secret_ref", "org_id", "oauth_client_secret_ref"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(Text)
    transport: Mapped[str] = mapped_column(String(32), default="streamable_http", server_default="streamable_http")
    secret_ref: Mapped[str | None] = mapped_column(String(36))
    # How the server is authenticated (app.mcp.catalog.AUTH_TYPES): "static" (secret_ref and
    # headers, or nothing), "oauth" (connections made by people) or "oauth_client_credentials".
    auth_type: Mapped[str] = mapped_column(String(32), default="static", server_default="static")
    # For OAuth: one connection for the org ("org") or one per member ("user").
    connection_scope: Mapped[str] = mapped_column(String(8), default="org", server_default="org")
    # A pre-registered OAuth client (else registration happens at connect time).
    oauth_client_id: Mapped[str | None] = mapped_column(String(255))
    oauth_client_secret_ref: Mapped[str | None] = mapped_column(String(36))
    oauth_client_auth: Mapped[str | None] = mapped_column(String(32))
    oauth_scopes: Mapped[list[str] | None] = mapped_column(JSON)
    status: Mapped[McpServerStatus] = mapped_column(
        status_type(McpServerStatus, 16), default=McpServerStatus.PENDING, server_default=McpServerStatus.PENDING.value
    )
    status_error_code: Mapped[str | None] = mapped_column(String(64))
    status_error_message: Mapped[str | None] = mapped_column(String(1000))
    validated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    tool_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_by: Mapped[str | None] = mapped_column(String(64))
    updated_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    # The legacy raw ``token`` (revision 0001) is not mapped; see app/backfill/legacy.py.
    # Read-only: app.mcp.service replaces the set (its rows) as a whole.
    headers: Mapped[list[McpServerHeader]] = relationship(viewonly=True, order_by="McpServerHeader.position")


class McpServerHeader(Base):
    """A header sent on every request to an MCP server: a template over one secret (``X-API-Key: {{secret}}``).

    The template holds only the ``{{secret}}`` placeholder, never a value; a worker substitutes
    the resolved secret at send time (``app.mcp.credentials``). Names are stored as given and
    unique per server case-insensitively.
    """

    __tablename__ = "mcp_server_headers"
    __table_args__ = (
        ForeignKeyConstraint(["org_id", "mcp_server_id"], ["mcp_servers.org_id", "mcp_servers.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["org_id", "secret_ref"], ["secrets.org_id", "secrets.id"]),
        Index("ix_mcp_server_headers_org_id_secret_ref", "org_id", "secret_ref"),
        UniqueConstraint("mcp_server_id", "name_key"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    mcp_server_id: Mapped[str] = mapped_column(String(36))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    # ``name`` lower-cased: one header name per server, compared case-insensitively as HTTP does.
    # (A column, not an index on ``lower(name)``: expression indexes cannot be reflected, so
    # ``alembic check`` could not compare the models with the migrations.)
    name_key: Mapped[str] = mapped_column(String(128))
    template: Mapped[str] = mapped_column(String(1000))
    secret_ref: Mapped[str] = mapped_column(String(36))


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id", "provider_id"], ["providers.org_id", "providers.id"]),
        Index("ix_agents_org_id_provider_id", "org_id", "provider_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    name: Mapped[str] = mapped_column(String(200))
    provider_id: Mapped[str | None] = mapped_column(String(36))
    model_id: Mapped[str | None] = mapped_column(String(200))
    system_prompt: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(64))
    updated_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    # The legacy ``model`` and ``secret_ref`` (revision 0001) are not mapped; see app/backfill/legacy.py.
    # Read-only: app.agents.service replaces the selection (its rows) as a whole.
    tools: Mapped[list[AgentTool]] = relationship(viewonly=True, order_by="AgentTool.id")


class McpTool(Base):
    """A tool from an MCP server's last successful ``tools/list``."""

    __tablename__ = "mcp_tools"
    __table_args__ = (
        UniqueConstraint("mcp_server_id", "name"),
        ForeignKeyConstraint(["org_id", "mcp_server_id"], ["mcp_servers.org_id", "mcp_servers.id"], ondelete="CASCADE"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    mcp_server_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    input_schema: Mapped[dict[str, Any]] = mapped_column(JSON)


class AgentTool(Base):
    """A tool an agent may offer to its model: one (MCP server, tool name) pair."""

    __tablename__ = "agent_tools"
    __table_args__ = (
        UniqueConstraint("agent_id", "mcp_server_id", "tool_name"),
        ForeignKeyConstraint(["org_id", "agent_id"], ["agents.org_id", "agents.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["org_id", "mcp_server_id"], ["mcp_servers.org_id", "mcp_servers.id"], ondelete="CASCADE"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    agent_id: Mapped[str] = mapped_column(String(36))
    mcp_server_id: Mapped[str] = mapped_column(String(36))
    tool_name: Mapped[str] = mapped_column(String(200))


class AgentRun(Base):
    """One run of an agent: input, ordered events, output and usage (all masked, never a secret)."""

    __tablename__ = "agent_runs"
    __table_args__ = (
        UniqueConstraint("org_id", "id"),
        ForeignKeyConstraint(["org_id", "agent_id"], ["agents.org_id", "agents.id"], ondelete="CASCADE"),
        Index("ix_agent_runs_org_id_agent_id", "org_id", "agent_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    agent_id: Mapped[str] = mapped_column(String(36))
    job_id: Mapped[str | None] = mapped_column(String(36))
    status: Mapped[JobStatus] = mapped_column(
        status_type(JobStatus, 16), default=JobStatus.QUEUED, server_default=JobStatus.QUEUED.value
    )
    input: Mapped[str] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    events: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
