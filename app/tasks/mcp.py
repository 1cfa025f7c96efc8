"""MCP tasks: validate a server (``app.mcp.validation``), and beat's refresh of every valid server's tools."""

from __future__ import annotations

from typing import Any

from celery import Task

from app.context import Actor, RequestContext
from app.jobs.names import TaskName
from app.mcp import authorization, validation
from app.mcp import service as mcp_service
from app.tasks.runtime import JobView, WorkerContext, job_task, periodic_task, worker_context

WORKER = RequestContext(Actor("worker"))


@job_task(TaskName.VALIDATE_SERVER, time_limit=90)
def validate_server(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Connect to the server with its secret, list its tools, and record valid or invalid."""
    return validation.validate(ctx, job)


@periodic_task(TaskName.REFRESH_TOOLS, time_limit=120)
def refresh_tools(self: Task) -> int:
    """Queue a validation of every valid server, so tool lists follow their servers (beat)."""
    with worker_context(self.app).db.session() as s:
        return mcp_service.queue_refresh(s, WORKER)


@job_task(TaskName.PREPARE_CONNECTION, time_limit=60, max_retries=0)
def prepare_connection(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Prepare an OAuth authorization: discovery, client, PKCE, state; answer the waiting request."""
    return authorization.prepare(ctx, job)


@job_task(TaskName.EXCHANGE_CODE, time_limit=60, max_retries=0)
def exchange_code(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Redeem an authorization code with its PKCE verifier; store the tokens; queue a validation."""
    return authorization.exchange(ctx, job)


@job_task(TaskName.REVOKE_CONNECTION, time_limit=60)
def revoke_connection(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Revoke a disconnected connection's tokens at the server (RFC 7009) and delete them."""
    return authorization.revoke(ctx, job)
