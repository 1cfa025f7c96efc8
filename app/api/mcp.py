"""MCP servers: members list, add (without a secret), validate; binding a secret needs an admin."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.api import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import JobAccepted, ListQuery
from app.identity.access import org_access as access_of
from app.jobs.schemas import JobOut
from app.mcp import service as mcp
from app.models import Job, McpServer
from app.schemas import Strict

TAGS = ["mcp"]


class McpServerCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=2000)
    transport: str = Field(default="streamable_http", pattern="^(streamable_http|sse)$")
    secret_ref: str | None = Field(default=None, description="Id of a secret of this org, sent as the bearer token.")
    token: Any = Field(default=None, description="Not accepted: create a secret and pass secret_ref.")


class McpServerUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    url: str | None = Field(default=None, min_length=1, max_length=2000)
    transport: str | None = Field(default=None, pattern="^(streamable_http|sse)$")
    secret_ref: str | None = None
    token: Any = Field(default=None, description="Not accepted: create a secret and pass secret_ref.")


class StatusError(BaseModel):
    code: str
    message: str


class McpServerOut(BaseModel):
    id: str
    name: str
    url: str
    transport: str
    secret_ref: str | None
    status: str = Field(description="pending | validating | valid | invalid")
    status_error: StatusError | None
    validated_at: datetime | None
    tool_count: int
    created_at: datetime
    updated_at: datetime


class McpServerWithJob(McpServerOut):
    job: JobOut | None = Field(description="The validation this change queued, if any.")


class McpServerList(BaseModel):
    items: list[McpServerOut]
    next_cursor: str | None


class ToolOut(BaseModel):
    name: str
    description: str | None
    input_schema: dict[str, Any]


class ToolList(BaseModel):
    items: list[ToolOut]


def server_out(server: McpServer) -> McpServerOut:
    error = (
        StatusError(code=server.status_error_code, message=server.status_error_message or "")
        if server.status_error_code
        else None
    )
    return McpServerOut(
        id=server.id,
        name=server.name,
        url=server.url,
        transport=server.transport,
        secret_ref=server.secret_ref,
        status=server.status,
        status_error=error,
        validated_at=server.validated_at,
        tool_count=server.tool_count,
        created_at=server.created_at,
        updated_at=server.updated_at,
    )


def _with_job(server: McpServer, job: Job | None) -> McpServerWithJob:
    return McpServerWithJob(**server_out(server).model_dump(), job=JobOut.model_validate(job) if job else None)


@route(bp, "/orgs/<org>/mcp-servers", "GET", query=ListQuery, response=McpServerList, tags=TAGS, errors=[401, 404])
def list_mcp_servers(org: str, query: ListQuery) -> McpServerList:
    """List the org's MCP servers and their validation status."""
    access = access_of(session(), current_user(), org)
    page = mcp.list_servers(session(), access.org, limit=query.limit, cursor=query.cursor)
    return McpServerList(items=[server_out(s) for s in page.items], next_cursor=page.next_cursor)


@route(
    bp,
    "/orgs/<org>/mcp-servers",
    "POST",
    body=McpServerCreate,
    response=McpServerWithJob,
    status=201,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422, 503],
    idempotent=True,
)
def create_mcp_server(org: str, body: McpServerCreate) -> Result:
    """Add an MCP server (binding a secret needs an org admin) and queue its validation."""
    access = access_of(session(), current_user(), org)
    server, job = mcp.create_server(session(), request_context(), access, _fields(body))
    return Result(_with_job(server, job), 201)


@route(bp, "/orgs/<org>/mcp-servers/<server_id>", "GET", response=McpServerOut, tags=TAGS, errors=[401, 404])
def get_mcp_server(org: str, server_id: str) -> McpServerOut:
    """One MCP server with its status and last validation error."""
    access = access_of(session(), current_user(), org)
    return server_out(mcp.get_server(session(), access.org, server_id))


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>",
    "PATCH",
    body=McpServerUpdate,
    response=McpServerWithJob,
    tags=TAGS,
    errors=[401, 403, 404, 422, 503],
)
def update_mcp_server(org: str, server_id: str, body: McpServerUpdate) -> McpServerWithJob:
    """Edit a server; a new URL, transport or secret re-validates it (admin when a secret is involved)."""
    access = access_of(session(), current_user(), org)
    server, job = mcp.update_server(session(), request_context(), access, server_id, _fields(body))
    return _with_job(server, job)


@route(bp, "/orgs/<org>/mcp-servers/<server_id>", "DELETE", status=204, tags=TAGS, errors=[401, 403, 404])
def delete_mcp_server(org: str, server_id: str) -> None:
    """Delete a server and its tool list (admin when a secret is bound)."""
    access = access_of(session(), current_user(), org)
    mcp.delete_server(session(), request_context(), access, server_id)


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/validate",
    "POST",
    response=JobAccepted,
    status=202,
    tags=TAGS,
    errors=[401, 404, 503],
)
def validate_mcp_server(org: str, server_id: str) -> Result:
    """Queue a validation: initialize + tools/list with the bound secret."""
    from app.api.jobs import accepted

    access = access_of(session(), current_user(), org)
    return accepted(mcp.request_validation(session(), request_context(), access, server_id))


@route(bp, "/orgs/<org>/mcp-servers/<server_id>/tools", "GET", response=ToolList, tags=TAGS, errors=[401, 404])
def list_mcp_tools(org: str, server_id: str) -> ToolList:
    """The tools the server listed at its last successful validation."""
    access = access_of(session(), current_user(), org)
    tools = mcp.list_tools(session(), access.org, server_id)
    return ToolList(items=[ToolOut(name=t.name, description=t.description, input_schema=t.input_schema) for t in tools])


def _fields(body: BaseModel) -> dict[str, Any]:
    return {name: getattr(body, name) for name in body.model_fields_set}
