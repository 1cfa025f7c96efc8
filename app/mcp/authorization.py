"""Connecting on the worker: prepare an authorization, redeem its code for tokens, revoke on disconnect.

``prepare`` (job ``mcp.prepare_connection``) discovers the server's authorization server, finds
or registers a client, makes the PKCE pair and the ``state``, seals what the exchange will need
(verifier, client, endpoints) to the workers' key in the flow row, keeps only the SHA-256 of
``state`` there, and answers the waiting web request with the authorization URL, sealed to
its one-request key. ``exchange`` (``mcp.exchange_code``) opens the verifier and the code the web
tier sealed, redeems them, stores the tokens (app.mcp.grants) and queues a validation that lists
the server's tools with them. ``revoke`` (``mcp.revoke_connection``) revokes the tokens at the
server where it supports RFC 7009 and deletes them. Every request goes through the egress guard.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import select

from app.audit import service as audit
from app.db import new_id, utcnow
from app.egress import EgressError
from app.errors import WorkerError
from app.jobs import service as jobs
from app.jobs.context import RunJob, Worker
from app.mcp import grants, oauth
from app.mcp.grants import WORKER
from app.models import ConnectionStatus, FlowStatus, McpConnection, McpServer, OAuthFlow
from app.models.connections import ORG_SUBJECT
from app.secrets import replies
from app.secrets.sealing import CiphertextError, encode_context, open_sealed, seal

log = logging.getLogger("latchkey.oauth")


def reply_context(org_id: str, flow_id: str, job_id: str) -> bytes:
    """The prepared authorization URL opens only for the request (job) that asked for that flow."""
    return encode_context("oauth-connect", org_id, flow_id, job_id)


class FlowError(WorkerError):
    """The flow cannot go on (gone, expired, used, or its server changed)."""


def _destination(server: McpServer) -> dict[str, Any]:
    return {"url": server.url, "transport": server.transport, "auth_type": server.auth_type}


def _load_flow(session: Any, job: RunJob, status: FlowStatus) -> tuple[OAuthFlow, McpServer]:
    flow_id = str(job.params.get("flow_id") or "")
    flow = session.scalar(
        select(OAuthFlow).where(OAuthFlow.org_id == job.org_id, OAuthFlow.id == flow_id).with_for_update()
    )
    if flow is None:
        raise FlowError("not_found", "the authorization no longer exists")
    if flow.status != status:
        raise FlowError("flow_used", f"the authorization is {flow.status}")
    if flow.expires_at <= utcnow():
        raise FlowError("flow_expired", "the authorization expired")
    server = session.scalar(
        select(McpServer).where(McpServer.org_id == flow.org_id, McpServer.id == flow.mcp_server_id)
    )
    if server is None:
        raise FlowError("not_found", "the MCP server no longer exists")
    if flow.destination != _destination(server):
        raise FlowError("stale", "the MCP server changed since the authorization began")
    return flow, server


def _reply(ctx: Worker, job: RunJob, flow_id: str, payload: dict[str, Any]) -> None:
    key = job.params.get("reply_public_key")
    if not isinstance(key, str) or job.org_id is None:
        return
    sealed = replies.seal_reply(key, reply_context(job.org_id, flow_id, job.id), payload)
    replies.hand_over(ctx.settings.redis_url, job.id, sealed)


def _fail_flow(ctx: Worker, flow_id: str, code: str) -> None:
    with ctx.db.session() as s:
        flow = s.get(OAuthFlow, flow_id, with_for_update=True)
        if flow is not None and flow.status not in (FlowStatus.COMPLETED, FlowStatus.FAILED):
            flow.status = FlowStatus.FAILED
            flow.error_code = code
            flow.sealed = None
            flow.code_sealed = None
            flow.completed_at = utcnow()


def _audit_failure(ctx: Worker, job: RunJob, server_id: str | None, exc: WorkerError, what: str) -> None:
    if job.org_id is None:
        return
    with ctx.db.session() as s:
        audit.record(
            s,
            WORKER,
            f"mcp_connection.{what}_failed",
            org_id=job.org_id,
            target_type="mcp_server",
            target_id=server_id,
            details={"job_id": job.id, "code": exc.code, "host": getattr(exc, "host", None)},
        )


# Prepare ---------------------------------------------------------------------------------------


def _wanted_scopes(session: Any, server: McpServer, subject: str, found: oauth.Discovery) -> list[str]:
    """Configured scopes, else the server's; plus any a 403 insufficient_scope asked for (a union)."""
    base = list(server.oauth_scopes or found.scopes)
    connection = session.scalar(
        select(McpConnection).where(McpConnection.mcp_server_id == server.id, McpConnection.subject == subject)
    )
    if connection is not None:
        for scope in [*connection.scopes, *connection.wanted_scopes]:
            if scope not in base:
                base.append(scope)
    return base


def _client(ctx: Worker, server: McpServer, found: oauth.Discovery, http: Any, scopes: list[str]) -> oauth.OAuthClient:
    """A pre-registered client, else a Client ID Metadata Document, else dynamic registration."""
    redirect_uri = ctx.settings.oauth_redirect_uri
    assert redirect_uri is not None
    if server.oauth_client_id:
        client = oauth.OAuthClient(server.oauth_client_id, server.oauth_client_auth or "none")
        return grants._client_secret(ctx, server, client)
    public_url = ctx.settings.public_url or ""
    if found.server.client_id_metadata_documents and public_url.startswith("https://"):
        return oauth.OAuthClient(oauth.client_metadata_url(public_url), "none")
    return oauth.register(http, found.server, redirect_uri, scopes)


def prepare(ctx: Worker, job: RunJob) -> dict[str, Any]:
    """Discover, register, make PKCE and state; answer the waiting request with the authorization URL."""
    flow_id = str(job.params.get("flow_id") or "")
    server_id: str | None = None
    try:
        if ctx.settings.oauth_redirect_uri is None:
            raise WorkerError("oauth_not_configured", "LATCHKEY_PUBLIC_URL is not set on the worker")
        with ctx.db.session() as s:
            flow, server = _load_flow(s, job, FlowStatus.PREPARING)
            server_id = server.id
            s.expunge(server)
            subject = flow.subject
        factory = grants.client_factory(ctx)
        with factory(()) as http:
            found = oauth.discover(http, server.url)
            with ctx.db.session() as s:
                scopes = _wanted_scopes(s, server, subject, found)
            client = _client(ctx, server, found, http, scopes)
        verifier, challenge = oauth.pkce_pair()
        state = grants.new_state()
        material = {
            "verifier": verifier,
            "client": client.stored(),
            "as": found.server.stored(),
            "resource": found.resource,
            "scopes": scopes,
        }
        url = oauth.authorization_url(
            found.server,
            client,
            redirect_uri=ctx.settings.oauth_redirect_uri,
            state=state,
            challenge=challenge,
            resource=found.resource,
            scopes=scopes,
        )
        keys = ctx.resolver.keyring.public_set()
        with ctx.db.session() as s:
            job.ensure_held(s)
            flow, server = _load_flow(s, job, FlowStatus.PREPARING)
            sealed = seal(
                keys,
                json.dumps(material).encode("utf-8"),
                grants.flow_context(flow.org_id, flow.id, flow.mcp_server_id, flow.subject),
            )
            flow.sealed, flow.key_id = sealed.ciphertext, sealed.key_id
            flow.state_hash = grants.state_hash(state)
            flow.scopes = scopes
            flow.status = FlowStatus.PENDING
            expires_at = flow.expires_at
            audit.record(
                s,
                WORKER,
                "mcp_connection.authorization_started",
                org_id=flow.org_id,
                target_type="mcp_server",
                target_id=flow.mcp_server_id,
                details={"job_id": job.id, "flow_id": flow.id, "subject": flow.subject, "scopes": scopes},
            )
    except WorkerError as exc:
        _fail_flow(ctx, flow_id, exc.code)
        _audit_failure(ctx, job, server_id, exc, "authorization")
        _reply(ctx, job, flow_id, {"error": exc.code, "message": exc.message})
        raise
    _reply(ctx, job, flow_id, {"authorization_url": url, "expires_at": expires_at.isoformat()})
    return {"flow_id": flow_id, "status": FlowStatus.PENDING}


# Exchange --------------------------------------------------------------------------------------


def exchange(ctx: Worker, job: RunJob) -> dict[str, Any]:
    """Redeem the code with the verifier, store the tokens, and queue a validation that uses them."""
    flow_id = str(job.params.get("flow_id") or "")
    server_id: str | None = None
    try:
        with ctx.db.session() as s:
            flow, server = _load_flow(s, job, FlowStatus.EXCHANGING)
            server_id = server.id
            if flow.sealed is None or flow.code_sealed is None:
                raise FlowError("flow_used", "the authorization holds no code")
            try:
                material = json.loads(
                    open_sealed(
                        ctx.resolver.keyring,
                        flow.sealed,
                        grants.flow_context(flow.org_id, flow.id, flow.mcp_server_id, flow.subject),
                        flow.key_id,
                    )
                )
                code = open_sealed(ctx.resolver.keyring, flow.code_sealed, grants.code_context(flow.org_id, flow.id))
            except (CiphertextError, ValueError):
                raise FlowError("flow_invalid", "the authorization's sealed data does not open") from None
            s.expunge(server)
            subject, user_id = flow.subject, flow.user_id
        client = grants._client_secret(ctx, server, oauth.OAuthClient.from_stored(material["client"]))
        auth_server = oauth.AuthServer.from_stored(material["as"])
        form = {
            "grant_type": "authorization_code",
            "code": code.decode("utf-8"),
            "redirect_uri": ctx.settings.oauth_redirect_uri or "",
            "code_verifier": material["verifier"],
            "resource": material["resource"],
        }
        tokens = oauth.token_request(grants.client_factory(ctx), auth_server, client, form)
        if not tokens.scopes and material.get("scopes"):
            tokens = oauth.TokenSet(
                tokens.access_token,
                tokens.refresh_token,
                tokens.expires_at,
                tokens.issued_at,
                tuple(material["scopes"]),
            )
        grant = grants.Grant(
            server.org_id, server.id, subject, tokens, client, auth_server, material["resource"], "authorization_code"
        )
        with ctx.db.session() as s:
            job.ensure_held(s)
            flow, live = _load_flow(s, job, FlowStatus.EXCHANGING)
            connection = s.scalar(
                select(McpConnection)
                .where(McpConnection.mcp_server_id == live.id, McpConnection.subject == subject)
                .with_for_update()
            )
            now = utcnow()
            if connection is None:
                connection = McpConnection(
                    id=new_id(),
                    org_id=live.org_id,
                    mcp_server_id=live.id,
                    subject=subject,
                    user_id=None if subject == ORG_SUBJECT else user_id,
                    status=ConnectionStatus.CONNECTED,
                    scopes=[],
                    wanted_scopes=[],
                    created_at=now,
                    updated_at=now,
                )
                s.add(connection)
                s.flush()
            version = grants.store(s, ctx, connection, live, grant)
            connection.connected_at = now
            connection.wanted_scopes = []
            flow.status = FlowStatus.COMPLETED
            flow.sealed = flow.code_sealed = None
            flow.completed_at = now
            audit.record(
                s,
                WORKER,
                "mcp_connection.connected",
                org_id=live.org_id,
                target_type="mcp_server",
                target_id=live.id,
                details={
                    "job_id": job.id,
                    "connection_id": connection.id,
                    "subject": subject,
                    "version": version,
                    "scopes": list(tokens.scopes),
                },
            )
            jobs.record_resolved(s, job.id, [{"secret_id": connection.secret_id, "version": version}])
            # List the server's tools with the new connection (its own job, as any validation).
            from app.mcp import service as mcp_service

            mcp_service.queue_validation(s, WORKER, live, user_id=user_id)
            connection_id = connection.id
    except WorkerError as exc:
        _fail_flow(ctx, flow_id, exc.code)
        if isinstance(exc, EgressError | oauth.OAuthError | FlowError):
            _audit_failure(ctx, job, server_id, exc, "exchange")
        raise
    return {"connection_id": connection_id, "status": ConnectionStatus.CONNECTED, "version": version}


# Revoke ----------------------------------------------------------------------------------------


def revoke(ctx: Worker, job: RunJob) -> dict[str, Any]:
    """Revoke a disconnected connection's tokens at the server (RFC 7009) and delete them."""
    connection_id = str(job.params.get("connection_id") or "")
    with ctx.db.session() as s:
        connection = s.scalar(
            select(McpConnection).where(McpConnection.org_id == job.org_id, McpConnection.id == connection_id)
        )
        if connection is None:
            return {"revoked": False, "reason": "gone"}
        if connection.status != ConnectionStatus.REVOKING:
            raise WorkerError("not_disconnected", "the connection is not being disconnected")
        server = s.get(McpServer, connection.mcp_server_id)
        s.expunge_all()
    revoked = 0
    if connection.secret_id is not None and server is not None:
        try:
            grant, _version = grants._open(ctx, connection, current=True)
            endpoint = grant.auth_server.revocation_endpoint
            if endpoint:
                client = grants._client_secret(ctx, server, grant.client)
                factory = grants.client_factory(ctx)
                for token, hint in (
                    (grant.tokens.refresh_token, "refresh_token"),
                    (grant.tokens.access_token, "access_token"),
                ):
                    if token and oauth.revoke(factory, endpoint, client, token, hint):
                        revoked += 1
        except WorkerError as exc:
            # Deleting the tokens matters more than telling the server: carry on, but record it.
            log.warning("connection %s: revocation at the server failed: %s", connection_id, exc.code)
    with ctx.db.session() as s:
        row = s.get(McpConnection, connection_id, with_for_update=True)
        if row is not None:
            grants.drop_tokens(s, row, ConnectionStatus.REVOKING, "disconnected", "disconnected by its user")
            s.delete(row)
        audit.record(
            s,
            WORKER,
            "mcp_connection.revoked",
            org_id=connection.org_id,
            target_type="mcp_server",
            target_id=connection.mcp_server_id,
            details={
                "job_id": job.id,
                "connection_id": connection_id,
                "subject": connection.subject,
                "revoked": revoked,
            },
        )
    return {"revoked": revoked > 0, "tokens_revoked": revoked}
