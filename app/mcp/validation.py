"""Validating an MCP server on a worker: connect with its secret, list its tools, store the outcome.

Runs without Celery (``app.jobs.context``): the task ``mcp.validate_server`` only hands it the
worker and the job. A validation whose server changed since it was queued ends ``stale``
before anything is resolved or sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.egress import EgressError, EgressPolicy, guarded_async_client
from app.egress import audit as egress_audit
from app.errors import WorkerError
from app.jobs import service as jobs
from app.jobs.context import RunJob, Worker
from app.mcp import grants, legacy, service
from app.mcp.client import McpError, list_tools
from app.mcp.credentials import (
    HeaderSpec,
    ServerCredentials,
    bearer_headers,
    header_specs,
    server_credentials,
)
from app.models import McpServer, McpServerStatus
from app.observability import redact
from app.observability.metrics import LEGACY_TOKEN_READS
from app.secrets.resolver import SecretNotFoundError

log = logging.getLogger("latchkey.mcp")

WORKER = RequestContext(Actor("worker"))


class ServerGoneError(WorkerError):
    """The server the job was queued for no longer exists."""


@dataclass(frozen=True)
class Snapshot:
    """What the validation is about; the outcome is stored only if the server still matches it."""

    org_id: str
    server_id: str
    url: str
    transport: str
    secret_ref: str | None
    headers: tuple[HeaderSpec, ...]
    legacy_token: str | None
    # service.destination(server) when the job started: the one definition of "still the same server".
    recorded: dict[str, Any]
    # Whose connection an OAuth server is called with (None: the org's).
    user_id: str | None
    # The row itself (detached), for the server's auth.
    server: McpServer

    def matches(self, server: McpServer) -> bool:
        """The server still is where this validation connected (one definition: ``destination``)."""
        return service.destination(server) == self.recorded


def _load(ctx: Worker, job: RunJob) -> Snapshot:
    """The server the job was queued for, checked against its recorded destination first."""
    recorded = service.recorded_destination(job.params)
    server_id = str(recorded.get("server_id") or "")
    with ctx.db.session() as s:
        # The headers are read with the row, before the status is written: a job's reads come before its
        # writes, so it never holds a server's row lock while waiting for another table.
        server = s.scalar(
            select(McpServer)
            .options(selectinload(McpServer.headers))
            .where(McpServer.org_id == job.org_id, McpServer.id == server_id)
        )
        if server is None:
            raise ServerGoneError("not_found", "the MCP server no longer exists")
        org_id = server.org_id
        current = service.destination(server)
        # A job queued before destinations were recorded (no url) compares as changed: it fails closed.
        changed = egress_audit.changed_fields(recorded, current)
        if not changed:
            # Before the contract migration, a server not yet backfilled may still carry a raw token.
            token = legacy.token(s, server.org_id, server.id) if server.secret_ref is None else None
            server.status = McpServerStatus.VALIDATING
            user_id = job.params.get("user_id")
            specs = header_specs(server)
            s.flush()
            s.expunge(server)
            return Snapshot(
                server.org_id,
                server.id,
                server.url,
                server.transport,
                server.secret_ref,
                specs,
                token,
                current,
                user_id if isinstance(user_id, str) else None,
                server,
            )
    # Unbound, re-bound, re-pointed or given other headers since the job was queued: nothing is
    # resolved or sent, and the server's status is left to the validation its change queued.
    raise egress_audit.stale(
        ctx.db,
        job.id,
        job.kind,
        changed,
        org_id=org_id,
        target_type="mcp_server",
        target_id=server_id,
        what="the MCP server",
    )


def _credentials(ctx: Worker, snap: Snapshot) -> ServerCredentials:
    """The headers to send and the host rules they impose (``app.mcp.credentials``), or the legacy token."""
    if snap.secret_ref is None and not snap.headers and snap.legacy_token:
        # Pre-backfill rows still carry a raw token: used, but counted and logged as deprecated.
        LEGACY_TOKEN_READS.labels("mcp_server").inc()
        redact.register(snap.legacy_token)
        log.warning("deprecated: MCP server %s still uses a legacy raw token (run the backfill)", snap.server_id)
        return ServerCredentials(headers=bearer_headers(snap.legacy_token), values=(snap.legacy_token,))
    return server_credentials(ctx, snap.server, snap.user_id, partial(ctx.resolver.resolve, snap.org_id), snap.headers)


def validate(ctx: Worker, job: RunJob) -> dict[str, Any]:
    """Connect to the server with its secret, list its tools, and record valid or invalid."""
    snap = _load(ctx, job)
    reads: list[dict[str, Any]] = []
    tools = None
    code: str | None = None
    message: str | None = None
    try:
        job.ensure_held()  # a worker that lost its lease sends nothing
        creds = _credentials(ctx, snap)
        reads.extend(creds.reads)
        factory = partial(guarded_async_client, EgressPolicy.from_settings(ctx.settings), host_rules=creds.host_rules)
        tools = list_tools(
            snap.url,
            transport=snap.transport,
            headers=creds.headers,
            http_client_factory=factory,
            timeout=ctx.settings.mcp_timeout_seconds,
        )
    except WorkerError as exc:  # the resolver, the egress guard, the MCP exchange
        code, message = exc.code, exc.message
        if isinstance(exc, McpError) and exc.code == "insufficient_scope":
            grants.want_scopes(ctx, snap.server, snap.user_id, exc.scopes)
        if isinstance(exc, SecretNotFoundError):
            message = "the bound secret no longer exists"
        elif isinstance(exc, EgressError):
            egress_audit.denied(
                ctx.db, job.id, exc, org_id=snap.org_id, target_type="mcp_server", target_id=snap.server_id
            )
    with ctx.db.session() as s:
        job.ensure_held(s)  # only the job's current holder records the outcome
        server = s.scalar(
            select(McpServer).where(McpServer.org_id == snap.org_id, McpServer.id == snap.server_id).with_for_update()
        )
        stale = server is None or not snap.matches(server)
        if server is not None and not stale:
            service.store_outcome(s, server, tools=tools, error_code=code, error_message=message)
        jobs.record_resolved(s, job.id, reads)
        audit.record(
            s,
            WORKER,
            "mcp_server.validate",
            org_id=snap.org_id,
            target_type="mcp_server",
            target_id=snap.server_id,
            details={
                "job_id": job.id,
                "status": McpServerStatus.VALID if tools is not None else McpServerStatus.INVALID,
                "error_code": code,
                "secrets": reads,
                "stale": stale,
            },
        )
    if tools is not None:
        return {"status": McpServerStatus.VALID, "tool_count": len(tools)}
    return {"status": McpServerStatus.INVALID, "error": {"code": code, "message": message}}
