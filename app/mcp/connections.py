"""MCP connections on the web tier: start an authorization, complete its callback, disconnect, show state.

The web tier never holds a token. ``connect`` queues a worker job that prepares the
authorization and waits for its sealed answer (the URL the user is sent to), like reveal does.
``complete`` is the callback: ``state`` must be one this user began for this org and server,
unused and at most ``LATCHKEY_OAUTH_FLOW_TTL_SECONDS`` old; the code is then sealed to the
workers' key and handed to a worker, which alone holds the PKCE verifier that makes it worth
anything. ``disconnect`` stops every use at once and has a worker revoke and delete the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis import Redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.access import OrgAccess, org_access
from app.audit import service as audit
from app.config import Settings
from app.context import RequestContext
from app.db import new_id, utcnow
from app.errors import ConflictError, ForbiddenError, LatchkeyError, NotFoundError, UnauthorizedError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.mcp import authorization, grants
from app.mcp.catalog import CONNECTION_AUTH_TYPES
from app.mcp.schemas import ConnectionOut
from app.models import ConnectionStatus, FlowStatus, Job, McpConnection, McpServer, OAuthFlow, Org, User
from app.models.connections import ORG_SUBJECT, per_user, subject_of
from app.secrets import replies
from app.secrets.keyring import PublicKeySet
from app.secrets.sealing import seal


class OAuthNotConfiguredError(ConflictError):
    code, title = "oauth_not_configured", "The MCP server does not use OAuth connections"


class InvalidStateError(NotFoundError):
    """Unknown, another user's, used or expired: all look alike (nothing to learn from which)."""

    code, title = "invalid_state", "Unknown, used or expired authorization"


class AuthorizationDeniedError(ForbiddenError):
    code, title = "authorization_denied", "The authorization server did not grant access"


class ConnectFailedError(LatchkeyError):
    """The worker could not prepare the authorization (discovery, registration, the egress guard)."""

    status, code, title = 502, "connect_failed", "The MCP server's authorization could not be prepared"


@dataclass(frozen=True)
class ConnectStart:
    authorization_url: str
    expires_at: datetime


def _subject(server: McpServer, ctx: RequestContext) -> str:
    """The caller's subject on ``server`` (``subject_of``); a per-user server needs a signed-in user."""
    subject = subject_of(server, ctx.actor.id)
    if subject is None:
        raise UnauthorizedError()
    return subject


def _oauth_server(session: Session, access: OrgAccess, server_id: str) -> McpServer:
    from app.mcp.service import get_server

    server = get_server(session, access, server_id)
    if server.auth_type != "oauth":
        raise OAuthNotConfiguredError("this MCP server does not use OAuth connections (auth.type is not oauth)")
    return server


# State for the caller --------------------------------------------------------------------------


def _shown_status(connection: McpConnection, now: datetime) -> str:
    if connection.status == ConnectionStatus.REVOKING:
        return ConnectionStatus.AUTH_REQUIRED
    if (
        connection.status == ConnectionStatus.CONNECTED
        and connection.expires_at is not None
        and connection.expires_at <= now
        and not connection.has_refresh_token
    ):
        return ConnectionStatus.EXPIRED
    return connection.status


def view(connection: McpConnection | None, server: McpServer, now: datetime | None = None) -> ConnectionOut:
    scope = server.connection_scope if server.auth_type == "oauth" else "org"
    if connection is None:
        return ConnectionOut(status=ConnectionStatus.AUTH_REQUIRED, scope=scope)
    return ConnectionOut(
        status=_shown_status(connection, now or utcnow()),
        scope=scope,
        connected_at=connection.connected_at,
        expires_at=connection.expires_at,
        scopes=list(connection.scopes or []),
        error_code=connection.error_code,
    )


def for_caller(session: Session, ctx: RequestContext, servers: Iterable[McpServer]) -> dict[str, ConnectionOut | None]:
    """Each server's connection as the caller would use it (None for servers without connections)."""
    wanted = [s for s in servers if s.auth_type in CONNECTION_AUTH_TYPES]
    out: dict[str, ConnectionOut | None] = {}
    if not wanted:
        return out
    subjects = {server.id: subject_of(server, ctx.actor.id) for server in wanted}
    rows = session.scalars(
        select(McpConnection).where(
            McpConnection.mcp_server_id.in_(list(subjects)),
            McpConnection.subject.in_({s for s in subjects.values() if s is not None}),
        )
    ).all()
    by_key = {(r.mcp_server_id, r.subject): r for r in rows}
    now = utcnow()
    for server in wanted:
        out[server.id] = view(by_key.get((server.id, subjects[server.id] or "")), server, now)
    return out


def my_connections(session: Session, ctx: RequestContext, access: OrgAccess) -> list[tuple[McpServer, ConnectionOut]]:
    """The org's OAuth servers with the connection the caller uses on each."""
    servers = session.scalars(
        select(McpServer)
        .where(McpServer.org_id == access.org.id, McpServer.auth_type.in_(CONNECTION_AUTH_TYPES))
        .order_by(McpServer.name)
    ).all()
    states = for_caller(session, ctx, servers)
    return [(s, states[s.id] or view(None, s)) for s in servers]


# Connect ----------------------------------------------------------------------------------------


def connect(
    session: Session,
    ctx: RequestContext,
    access: OrgAccess,
    server_id: str,
    *,
    redis: Redis,
    settings: Settings,
) -> ConnectStart:
    """Have a worker prepare an authorization for the caller; the URL to send the user to.

    An org-wide connection is made by an org admin; a per-user one by any member, for themselves.
    Commits the session itself (the job must be out before the request waits for its answer).
    """
    server = _oauth_server(session, access, server_id)
    if not per_user(server):
        access.require_admin()
    if ctx.actor.id is None:
        raise UnauthorizedError()
    if settings.oauth_redirect_uri is None:
        raise OAuthNotConfiguredError("OAuth connections need LATCHKEY_PUBLIC_URL (where users come back to)")
    now = utcnow()
    flow = OAuthFlow(
        id=new_id(),
        org_id=server.org_id,
        mcp_server_id=server.id,
        user_id=ctx.actor.id,
        subject=_subject(server, ctx),
        status=FlowStatus.PREPARING,
        scopes=[],
        destination=authorization._destination(server),
        expires_at=now + timedelta(seconds=settings.oauth_flow_ttl_seconds),
        created_at=now,
    )
    session.add(flow)
    session.flush()
    private_key, public_key = replies.new_key_pair()
    job = jobs.create_job(
        session,
        ctx,
        org_id=server.org_id,
        kind=TaskName.PREPARE_CONNECTION,
        params={"flow_id": flow.id, "server_id": server.id, "reply_public_key": public_key},
    )
    flow.job_id = job.id
    flow_id, job_id, org_id = flow.id, job.id, server.org_id
    session.commit()
    reply = replies.wait_for_reply(
        session,
        redis,
        job_id,
        private_key,
        authorization.reply_context(org_id, flow_id, job_id),
        # The worker's discovery and registration are MCP-timeout-bound requests of their own.
        timeout=settings.reveal_timeout_seconds + settings.mcp_timeout_seconds,
        what="connect",
    )
    code = replies.error_code(reply)
    if code is not None:
        message = reply.get("message")
        detail = message if isinstance(message, str) and len(message) <= 300 else "the worker could not prepare it"
        raise ConnectFailedError(f"{detail} ({code})", reason=code)
    url, expires = reply.get("authorization_url"), reply.get("expires_at")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or not isinstance(expires, str):
        raise ConnectFailedError("the worker's answer was malformed")
    return ConnectStart(url, datetime.fromisoformat(expires).astimezone(UTC))


# Callback ---------------------------------------------------------------------------------------


def complete(
    session: Session,
    ctx: RequestContext,
    user: User,
    keys: PublicKeySet,
    *,
    state: str | None,
    code: str | None,
    error: str | None = None,
) -> tuple[Job, McpServer, Org]:
    """The callback: check ``state`` against its flow and this user, seal the code, queue the exchange."""
    if not state or len(state) > 512:
        raise InvalidStateError("the authorization's state is missing")
    flow = session.scalar(select(OAuthFlow).where(OAuthFlow.state_hash == grants.state_hash(state)).with_for_update())
    # Another user's state is answered exactly like an unknown one.
    if flow is None or flow.user_id != user.id:
        raise InvalidStateError("this authorization is unknown, or was begun by someone else")
    if flow.status != FlowStatus.PENDING:
        raise InvalidStateError("this authorization was already used")
    org = session.get(Org, flow.org_id)
    server = session.get(McpServer, flow.mcp_server_id)
    assert org is not None and server is not None  # foreign keys
    now = utcnow()
    if flow.expires_at <= now:
        _end(session, flow, "flow_expired")
        raise InvalidStateError("this authorization expired: connect again")
    # Still a member (and still an admin, for an org-wide connection)?
    access = org_access(session, user, org.slug)
    if flow.subject == ORG_SUBJECT:
        access.require_admin()
    if error is not None:
        _end(session, flow, "access_denied")
        audit.record(
            session,
            ctx,
            "mcp_connection.denied",
            org_id=org.id,
            target_type="mcp_server",
            target_id=server.id,
            details={"flow_id": flow.id, "error": error[:64]},
        )
        session.commit()
        raise AuthorizationDeniedError("the authorization server did not grant access")
    if not code or len(code) > 4096:
        raise InvalidStateError("the authorization's code is missing")
    sealed = seal(keys, code.encode("utf-8"), grants.code_context(flow.org_id, flow.id))
    # Single use: only the request that moves the flow out of "pending" goes on.
    moved = session.execute(
        update(OAuthFlow)
        .where(OAuthFlow.id == flow.id, OAuthFlow.status == FlowStatus.PENDING)
        .values(status=FlowStatus.EXCHANGING, code_sealed=sealed.ciphertext)
        .execution_options(synchronize_session=False)
    )
    if moved.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidStateError("this authorization was already used")
    job = jobs.create_job(
        session, ctx, org_id=org.id, kind=TaskName.EXCHANGE_CODE, params={"flow_id": flow.id, "server_id": server.id}
    )
    audit.record(
        session,
        ctx,
        "mcp_connection.callback",
        org_id=org.id,
        target_type="mcp_server",
        target_id=server.id,
        details={"flow_id": flow.id, "job_id": job.id, "subject": flow.subject},
    )
    return job, server, org


def _end(session: Session, flow: OAuthFlow, code: str) -> None:
    flow.status = FlowStatus.FAILED
    flow.error_code = code
    flow.sealed = None
    flow.code_sealed = None
    flow.completed_at = utcnow()
    session.flush()


# Disconnect -------------------------------------------------------------------------------------


def disconnect(session: Session, ctx: RequestContext, access: OrgAccess, server_id: str) -> Job:
    """Stop using the caller's connection now; a worker revokes and deletes its tokens."""
    from app.mcp.service import get_server

    server = get_server(session, access, server_id)
    if server.auth_type not in CONNECTION_AUTH_TYPES:
        raise OAuthNotConfiguredError("this MCP server has no connections")
    if not per_user(server):
        access.require_admin()
    if ctx.actor.id is None:
        raise UnauthorizedError()
    subject = _subject(server, ctx)
    connection = session.scalar(
        select(McpConnection)
        .where(McpConnection.mcp_server_id == server.id, McpConnection.subject == subject)
        .with_for_update()
    )
    if connection is None or connection.status == ConnectionStatus.REVOKING:
        raise NotFoundError("no connection to disconnect")
    connection.status = ConnectionStatus.REVOKING
    connection.updated_at = utcnow()
    if connection.secret_id is not None:
        # Every worker drops what it holds of this connection before this request returns.
        grants.invalidate(session, connection.org_id, connection.secret_id)
    job = jobs.create_job(
        session,
        ctx,
        org_id=server.org_id,
        kind=TaskName.REVOKE_CONNECTION,
        params={"connection_id": connection.id, "server_id": server.id},
    )
    audit.record(
        session,
        ctx,
        "mcp_connection.disconnect",
        org_id=server.org_id,
        target_type="mcp_server",
        target_id=server.id,
        details={"connection_id": connection.id, "subject": subject, "job_id": job.id},
    )
    return job
