"""MCP server records: create, edit, delete, validate, tools.

Binding a secret to a server (as its bearer ``secret_ref`` or in a credential header), or
changing the URL of a server that has one, sends that secret to a new destination: only org
admins may do either (a member could otherwise point a server at their own host and receive
the secret). Members may add and edit servers that carry no secret, read everything and ask
for a validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.db import new_id, utcnow
from app.errors import FieldError, ForbiddenError, NotFoundError, ValidationFailedError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.mcp import catalog, legacy
from app.mcp.client import ToolInfo
from app.mcp.schemas import AuthIn, HeaderIn, McpServerCreate, McpServerUpdate
from app.models import (
    ConnectionStatus,
    Job,
    McpConnection,
    McpServer,
    McpServerHeader,
    McpServerStatus,
    McpTool,
    OAuthFlow,
)
from app.models.connections import per_user
from app.pagination import Page, paginate
from app.secrets.service import check_secret_ref

RAW_CREDENTIAL_REFUSAL = (
    "raw tokens are not accepted: create a secret (POST /orgs/{org}/secrets) and pass its id as secret_ref"
)


def list_servers(session: Session, access: OrgAccess, *, limit: int, cursor: str | None) -> Page[McpServer]:
    """The org's servers (any member)."""
    stmt = select(McpServer).where(McpServer.org_id == access.org.id).options(selectinload(McpServer.headers))
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


# The keys of a destination; ``headers`` only when the server has any, so the destination of a
# server without header credentials (and the params of its jobs) is what it was before them.
DESTINATION_KEYS = (
    "server_id",
    "url",
    "transport",
    "secret_ref",
    "headers",
    "auth_type",
    "connection_scope",
    "oauth_client_secret_ref",
)


def header_rows(server: McpServer) -> list[dict[str, str]]:
    """The server's credential headers in order: name, template and secret id (never a value)."""
    return [{"name": h.name, "template": h.template, "secret_ref": h.secret_ref} for h in server.headers]


def destination(server: McpServer) -> dict[str, Any]:
    """Where a job would send this server's credentials: ids, URL, transport, header templates and
    auth, never a value.

    Recorded in the params of every job that will connect to the server (validation, agent runs),
    and compared with the row by the worker before it resolves a secret: a job whose server
    was unbound, re-bound, re-pointed or given other headers since it was queued ends ``stale``
    without connecting.
    """
    found: dict[str, Any] = {
        "server_id": server.id,
        "url": server.url,
        "transport": server.transport,
        "secret_ref": server.secret_ref,
    }
    headers = header_rows(server)
    if headers:
        found["headers"] = headers
    if server.auth_type != "static":
        # OAuth servers only, so a static server's destination (and its queued jobs) is unchanged.
        found["auth_type"] = server.auth_type
        found["connection_scope"] = server.connection_scope
        found["oauth_client_secret_ref"] = server.oauth_client_secret_ref
    return found


def recorded_destination(params: dict[str, Any]) -> dict[str, Any]:
    """The destination a job recorded (its params hold ``destination(server)``)."""
    return {key: params[key] for key in DESTINATION_KEYS if key in params}


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


def _check_headers(
    session: Session, access: OrgAccess, headers: Sequence[HeaderIn], *, bearer: bool
) -> list[dict[str, str]]:
    """The header set as it will be stored, every secret checked as ``secret_ref`` is (org admin)."""
    problems = [
        FieldError(f"headers.{i}.name", message)
        for i, message in catalog.header_names([h.name for h in headers], bearer=bearer)
    ]
    if problems:
        raise ValidationFailedError(problems)
    rows = []
    for i, header in enumerate(headers):
        try:
            ref = check_secret_ref(session, access.org, header.secret_ref)
        except ValidationFailedError as exc:
            # The same answer as for secret_ref (another org's id is a missing one), on this header's field.
            raise ValidationFailedError(
                [FieldError(f"headers.{i}.secret_ref", e.message) for e in exc.errors]
            ) from None
        rows.append({"name": header.name, "template": header.template, "secret_ref": ref})
    return rows


def _set_headers(session: Session, server: McpServer, rows: list[dict[str, str]]) -> None:
    """Replace the server's header set as a whole."""
    session.execute(delete(McpServerHeader).where(McpServerHeader.mcp_server_id == server.id))
    session.flush()
    for position, row in enumerate(rows):
        session.add(
            McpServerHeader(
                org_id=server.org_id,
                mcp_server_id=server.id,
                position=position,
                name=row["name"],
                name_key=row["name"].lower(),
                template=row["template"],
                secret_ref=row["secret_ref"],
            )
        )
    session.flush()
    session.expire(server, ["headers"])


def _audited_headers(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """What an audit event says of a header set: names and secret ids (the template is not a value, but
    need not be repeated)."""
    return [{"name": row["name"], "secret_ref": row["secret_ref"]} for row in rows]


def create_server(
    session: Session, ctx: RequestContext, access: OrgAccess, data: McpServerCreate
) -> tuple[McpServer, Job]:
    """Add a server and queue its first validation (any member; binding a secret: org admin)."""
    _refuse_raw_token(access, data)
    name, url, transport, secret_ref = data.name, data.url, data.transport, data.secret_ref
    headers = data.headers or []
    if (secret_ref is not None or headers) and not access.is_admin:
        raise ForbiddenError("binding a secret to an MCP server needs the org admin role")
    if secret_ref is not None:
        secret_ref = check_secret_ref(session, access.org, secret_ref)
    header_set = _check_headers(session, access, headers, bearer=secret_ref is not None)
    auth = _check_auth(session, access, data.auth, secret_ref)
    if auth["auth_type"] != "static" and headers and any(h["name"].lower() == "authorization" for h in header_set):
        raise ValidationFailedError.single("headers", "an OAuth server sends its own Authorization header")
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
    _set_headers(session, server, header_set)
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
            "headers": _audited_headers(header_set),
            "auth_type": auth["auth_type"],
            "oauth_client_secret_ref": auth["oauth_client_secret_ref"],
        },
    )
    return server, queue_validation(session, ctx, server)


def update_server(
    session: Session, ctx: RequestContext, access: OrgAccess, server_id: str, data: McpServerUpdate
) -> tuple[McpServer, Job | None]:
    """Edit a server; a new URL, transport, secret or header set re-queues validation (a secret involved: org admin)."""
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
    if data.headers is not None:
        wanted = [{"name": h.name, "template": h.template, "secret_ref": h.secret_ref} for h in data.headers]
        if wanted != header_rows(server):
            # Before any lookup: a member's 403 never depends on which secret ids exist.
            if not access.is_admin:
                raise ForbiddenError("changing the credential headers of an MCP server needs the org admin role")
            # Checked against the server's secret_ref as it is after this edit.
            _set_headers(
                session, server, _check_headers(session, access, data.headers, bearer=server.secret_ref is not None)
            )
            changed.append("headers")
    # A new bearer secret_ref must not meet an Authorization header already stored.
    rebound = "secret_ref" in changed and "headers" not in changed and server.secret_ref is not None
    if rebound and catalog.header_names([h.name for h in server.headers], bearer=True):
        raise ValidationFailedError.single(
            "secret_ref", "the server already sends an Authorization header: remove that header first"
        )
    if url is not None and url != server.url:
        if _holds_credential(session, server) and not access.is_admin:
            raise ForbiddenError("changing the URL of a server with a bound secret needs the org admin role")
        server.url = url
        changed.append("url")
    if transport is not None and transport != server.transport:
        server.transport = transport
        changed.append("transport")
    if "auth" in sent:
        auth = _check_auth(session, access, data.auth, server.secret_ref)
        current = {key: getattr(server, key) for key in auth}
        if auth != current:
            if server.oauth_client_secret_ref is not None and not access.is_admin:
                raise ForbiddenError("changing the auth of a server with a client secret needs the org admin role")
            for key, value in auth.items():
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
        details={
            "changed": changed,
            "url": server.url,
            "secret_ref": server.secret_ref,
            "headers": _audited_headers(header_rows(server)),
        },
    )
    job = (
        queue_validation(session, ctx, server)
        if {"url", "transport", "secret_ref", "headers", "auth"} & set(changed)
        else None
    )
    return server, job


def _holds_credential(session: Session, server: McpServer) -> bool:
    """A bound secret (bearer, header or OAuth client secret), a connection's tokens, or (before the
    contract migration) a legacy raw token not yet backfilled."""
    if server.secret_ref is not None or server.headers or server.oauth_client_secret_ref is not None:
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
    session.execute(delete(McpServerHeader).where(McpServerHeader.mcp_server_id == server.id))
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
    servers = [s for s in servers if not per_user(s)]
    for server in servers:
        # The server as it is now: a refresh that runs after a change ends stale, unsent.
        params = {**destination(server), "user_id": None}
        jobs.create_job(session, ctx, org_id=server.org_id, kind=TaskName.VALIDATE_SERVER, params=params)
    return len(servers)
