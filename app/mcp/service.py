"""MCP server records: create, edit, delete, validate, tools.

Binding a secret to a server, or changing the URL of a server that has one, sends that
secret to a new destination: only org admins may do either (a member could otherwise point
a server at their own host and receive the secret). Members may add and edit servers that
carry no secret, read everything and ask for a validation.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.db import new_id, utcnow
from app.errors import ForbiddenError, NotFoundError, ValidationFailedError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.mcp import legacy
from app.mcp.client import ToolInfo
from app.mcp.schemas import AuthIn, McpServerCreate, McpServerUpdate
from app.models import ConnectionStatus, Job, McpConnection, McpServer, McpServerStatus, McpTool, OAuthFlow
from app.pagination import Page, paginate
from app.secrets.service import check_secret_ref

RAW_CREDENTIAL_REFUSAL = (
    "raw tokens are not accepted: create a secret (POST /orgs/{org}/secrets) and pass its id as secret_ref"
)


def list_servers(session: Session, access: OrgAccess, *, limit: int, cursor: str | None) -> Page[McpServer]:
    """The org's servers (any member)."""
    stmt = select(McpServer).where(McpServer.org_id == access.org.id)
    return paginate(session, stmt, McpServer.id, limit=limit, cursor=cursor)


def servers_by_id(session: Session, access: OrgAccess, ids: list[str]) -> list[McpServer]:
    """These servers of the org (any member), in no particular order."""
    if not ids:
        return []
    return list(session.scalars(select(McpServer).where(McpServer.org_id == access.org.id, McpServer.id.in_(ids))))


def get_server(session: Session, access: OrgAccess, server_id: str, *, for_update: bool = False) -> McpServer:
    """One server of the org (any member)."""
    stmt = select(McpServer).where(McpServer.org_id == access.org.id, McpServer.id == server_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    server: McpServer | None = session.scalar(stmt)
    if server is None:
        raise NotFoundError("MCP server not found")
    return server


def destination(server: McpServer) -> dict[str, Any]:
    """Where a job would send this server's credential: ids, URL, transport and auth, never a value.

    Recorded in the params of every job that will connect to the server (validation, agent runs),
    and compared with the row by the worker before it resolves the secret: a job whose server
    was unbound, re-bound or re-pointed since it was queued ends ``stale`` without connecting.
    """
    return {
        "server_id": server.id,
        "url": server.url,
        "transport": server.transport,
        "secret_ref": server.secret_ref,
        "auth_type": server.auth_type,
        "connection_scope": server.connection_scope,
        "oauth_client_secret_ref": server.oauth_client_secret_ref,
    }


def queue_validation(session: Session, ctx: RequestContext, server: McpServer, *, user_id: str | None = None) -> Job:
    """Queue a validation of the server as it is now (its destination is recorded in the job).

    ``user_id``: whose connection a per-user OAuth server is validated with (default: the caller).
    """
    server.status = McpServerStatus.PENDING
    server.status_error_code = None
    server.status_error_message = None
    params = destination(server)
    params["user_id"] = user_id if user_id is not None else ctx.actor.id
    return jobs.create_job(session, ctx, org_id=server.org_id, kind=TaskName.VALIDATE_SERVER, params=params)


def _refuse_raw_token(access: OrgAccess, data: McpServerCreate | McpServerUpdate) -> None:
    if "token" in data.model_fields_set:
        raise ValidationFailedError.single("token", RAW_CREDENTIAL_REFUSAL.format(org=access.org.slug))


def _check_auth(session: Session, access: OrgAccess, auth: AuthIn | None, secret_ref: str | None) -> dict[str, Any]:
    """The auth columns ``auth`` asks for (binding a client secret: org admin)."""
    if auth is None or auth.type in ("none", "bearer", "headers"):
        return {
            "auth_type": "static",
            "connection_scope": "org",
            "oauth_client_id": None,
            "oauth_client_secret_ref": None,
            "oauth_client_auth": None,
            "oauth_scopes": None,
        }
    if secret_ref is not None:
        raise ValidationFailedError.single("secret_ref", "an OAuth server gets its tokens from its connections")
    client_secret_ref = auth.client_secret_ref
    method = auth.token_endpoint_auth_method
    if client_secret_ref is not None:
        if not access.is_admin:
            raise ForbiddenError("binding a client secret to an MCP server needs the org admin role")
        client_secret_ref = check_secret_ref(session, access.org, client_secret_ref)
        if auth.client_id is None:
            raise ValidationFailedError.single("auth.client_id", "a client secret needs its client id")
        method = method or "client_secret_basic"
    elif method not in (None, "none"):
        raise ValidationFailedError.single("auth.client_secret_ref", f"{method} needs a client secret")
    if auth.type == "oauth_client_credentials" and (auth.client_id is None or client_secret_ref is None):
        raise ValidationFailedError.single(
            "auth.client_id", "client credentials need a client id and a client secret (client_secret_ref)"
        )
    return {
        "auth_type": auth.type,
        "connection_scope": auth.scope if auth.type == "oauth" else "org",
        "oauth_client_id": auth.client_id,
        "oauth_client_secret_ref": client_secret_ref,
        "oauth_client_auth": method if auth.client_id is not None else None,
        "oauth_scopes": auth.scopes,
    }


def _drop_connections(session: Session, server: McpServer) -> int:
    """A server that moved or changed its auth: its tokens were issued for what it was, so they go."""
    from app.mcp import grants

    rows = session.scalars(select(McpConnection).where(McpConnection.mcp_server_id == server.id)).all()
    for row in rows:
        grants.drop_tokens(
            session, row, ConnectionStatus.AUTH_REQUIRED, "server_changed", "the MCP server changed: connect again"
        )
    return len(rows)


def _has_connections(session: Session, server: McpServer) -> bool:
    return (
        session.scalar(
            select(McpConnection.id)
            .where(McpConnection.mcp_server_id == server.id, McpConnection.secret_id.is_not(None))
            .limit(1)
        )
        is not None
    )


def create_server(
    session: Session, ctx: RequestContext, access: OrgAccess, data: McpServerCreate
) -> tuple[McpServer, Job]:
    """Add a server and queue its first validation (any member; binding a secret: org admin)."""
    _refuse_raw_token(access, data)
    name, url, transport, secret_ref = data.name, data.url, data.transport, data.secret_ref
    if secret_ref is not None:
        if not access.is_admin:
            raise ForbiddenError("binding a secret to an MCP server needs the org admin role")
        secret_ref = check_secret_ref(session, access.org, secret_ref)
    auth = _check_auth(session, access, data.auth, secret_ref)
    now = utcnow()
    server = McpServer(
        id=new_id(),
        org_id=access.org.id,
        name=name,
        url=url,
        transport=transport,
        secret_ref=secret_ref,
        **auth,
        status=McpServerStatus.PENDING,
        tool_count=0,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(server)
    session.flush()
    audit.record(
        session,
        ctx,
        "mcp_server.create",
        org_id=access.org.id,
        target_type="mcp_server",
        target_id=server.id,
        details={
            "name": name,
            "url": url,
            "transport": transport,
            "secret_ref": secret_ref,
            "auth_type": auth["auth_type"],
            "oauth_client_secret_ref": auth["oauth_client_secret_ref"],
        },
    )
    return server, queue_validation(session, ctx, server)


def update_server(
    session: Session, ctx: RequestContext, access: OrgAccess, server_id: str, data: McpServerUpdate
) -> tuple[McpServer, Job | None]:
    """Edit a server; a new URL, transport or secret re-queues validation (a secret involved: org admin)."""
    _refuse_raw_token(access, data)
    sent = data.model_dump(exclude_unset=True)
    name, url, transport = data.name, data.url, data.transport
    server = get_server(session, access, server_id, for_update=True)

    changed: list[str] = []
    if "secret_ref" in sent and sent["secret_ref"] != server.secret_ref:
        new_ref = sent["secret_ref"]
        if new_ref is not None:
            if not access.is_admin:
                raise ForbiddenError("binding a secret to an MCP server needs the org admin role")
            new_ref = check_secret_ref(session, access.org, new_ref)
        elif server.secret_ref is not None and not access.is_admin:
            raise ForbiddenError("unbinding a secret from an MCP server needs the org admin role")
        server.secret_ref = new_ref
        changed.append("secret_ref")
    if url is not None and url != server.url:
        if _holds_credential(session, server) and not access.is_admin:
            raise ForbiddenError("changing the URL of a server with a bound secret needs the org admin role")
        server.url = url
        changed.append("url")
    if transport is not None and transport != server.transport:
        server.transport = transport
        changed.append("transport")
    if "auth" in sent:
        wanted = _check_auth(session, access, data.auth, server.secret_ref)
        current = {key: getattr(server, key) for key in wanted}
        if wanted != current:
            if server.oauth_client_secret_ref is not None and not access.is_admin:
                raise ForbiddenError("changing the auth of a server with a client secret needs the org admin role")
            for key, value in wanted.items():
                setattr(server, key, value)
            changed.append("auth")
    if {"url", "transport", "auth"} & set(changed) and _has_connections(session, server):
        if not access.is_admin:
            raise ForbiddenError("changing a connected server's URL or auth needs the org admin role")
        _drop_connections(session, server)
    if name is not None and name != server.name:
        server.name = name
        changed.append("name")
    if not changed:
        return server, None
    server.updated_at = utcnow()
    server.updated_by = ctx.actor.id
    session.flush()
    audit.record(
        session,
        ctx,
        "mcp_server.update",
        org_id=access.org.id,
        target_type="mcp_server",
        target_id=server.id,
        details={"changed": changed, "url": server.url, "secret_ref": server.secret_ref},
    )
    job = queue_validation(session, ctx, server) if {"url", "transport", "secret_ref", "auth"} & set(changed) else None
    return server, job


def _holds_credential(session: Session, server: McpServer) -> bool:
    """A bound secret, or (before the contract migration) a legacy raw token not yet backfilled."""
    if server.secret_ref is not None or server.oauth_client_secret_ref is not None:
        return True
    if _has_connections(session, server):
        return True
    return legacy.has_token(session, server.org_id, server.id)


def delete_server(session: Session, ctx: RequestContext, access: OrgAccess, server_id: str) -> None:
    """Delete a server and its tool list (any member; a bound secret: org admin)."""
    server = get_server(session, access, server_id, for_update=True)
    if _holds_credential(session, server) and not access.is_admin:
        raise ForbiddenError("deleting a server with a bound secret needs the org admin role")
    session.execute(delete(McpTool).where(McpTool.mcp_server_id == server.id))
    _drop_connections(session, server)
    session.execute(delete(McpConnection).where(McpConnection.mcp_server_id == server.id))
    session.execute(delete(OAuthFlow).where(OAuthFlow.mcp_server_id == server.id))
    session.delete(server)
    session.flush()
    audit.record(
        session,
        ctx,
        "mcp_server.delete",
        org_id=access.org.id,
        target_type="mcp_server",
        target_id=server_id,
        details={"name": server.name},
    )


def request_validation(session: Session, ctx: RequestContext, access: OrgAccess, server_id: str) -> Job:
    """Queue a validation (any member: it sends the secret only where an admin allowed it)."""
    server = get_server(session, access, server_id, for_update=True)
    server.updated_at = utcnow()
    return queue_validation(session, ctx, server)


def list_tools(session: Session, access: OrgAccess, server_id: str) -> list[McpTool]:
    """The tools of the server's last successful validation (any member)."""
    server = get_server(session, access, server_id)
    return list(session.scalars(select(McpTool).where(McpTool.mcp_server_id == server.id).order_by(McpTool.name)))


# Worker side ------------------------------------------------------------------------------


def store_outcome(
    session: Session,
    server: McpServer,
    *,
    tools: list[ToolInfo] | None,
    error_code: str | None,
    error_message: str | None,
) -> None:
    """Record a validation: the tool list when valid, the error otherwise."""
    now = utcnow()
    server.validated_at = now
    if tools is not None:
        session.execute(delete(McpTool).where(McpTool.mcp_server_id == server.id))
        for tool in tools:
            session.add(
                McpTool(
                    org_id=server.org_id,
                    mcp_server_id=server.id,
                    name=tool.name[:200],
                    description=tool.description,
                    input_schema=tool.input_schema,
                )
            )
        server.status = McpServerStatus.VALID
        server.status_error_code = None
        server.status_error_message = None
        server.tool_count = len(tools)
    else:
        server.status = McpServerStatus.INVALID
        server.status_error_code = error_code
        server.status_error_message = (error_message or "")[:1000]
    session.flush()


def queue_refresh(session: Session, ctx: RequestContext) -> int:
    """Queue a validation of every valid server, so tool lists follow their servers (beat's refresh)."""
    servers = session.scalars(select(McpServer).where(McpServer.status == McpServerStatus.VALID)).all()
    # A per-user OAuth server has no connection a job without a user could use: beat skips it
    # (its tools are refreshed whenever a member connects or asks for a validation).
    servers = [s for s in servers if not (s.auth_type == "oauth" and s.connection_scope == "user")]
    for server in servers:
        # The server as it is now: a refresh that runs after a change ends stale, unsent.
        params = {**destination(server), "user_id": None}
        jobs.create_job(session, ctx, org_id=server.org_id, kind=TaskName.VALIDATE_SERVER, params=params)
    return len(servers)
