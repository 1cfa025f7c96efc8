"""MCP servers: members list, add (without a secret), validate; binding a secret needs an admin."""

from __future__ import annotations

from flask import current_app
from pydantic import ConfigDict, Field

from app.access import OrgAccess
from app.api.blueprint import bp
from app.api.jobs import accepted
from app.api.request import current_user, request_context, session
from app.api.routing import Result, route
from app.api.schemas import JobAccepted, ListQuery
from app.api.secrets import _keys
from app.jobs.schemas import JobOut
from app.mcp import connections
from app.mcp import service as mcp
from app.mcp.schemas import (
    CallbackIn,
    ConnectionOut,
    ConnectOut,
    McpServerCreate,
    McpServerList,
    McpServerOut,
    McpServerUpdate,
    ToolList,
    ToolOut,
)
from app.models import Job, McpServer

TAGS = ["mcp"]


class McpServerWithJob(McpServerOut):
    # Set from the job after the row's fields, yet listed as always present in the response.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)

    job: JobOut | None = Field(default=None, description="The validation this change queued, if any.")


def _out(server: McpServer) -> McpServerOut:
    """A server as the caller sees it: with the connection their runs would use (OAuth servers)."""
    state = connections.for_caller(session(), request_context(), [server]).get(server.id)
    return McpServerOut.model_validate(server).model_copy(update={"connection": state})


def _with_job(server: McpServer, job: Job | None) -> McpServerWithJob:
    state = connections.for_caller(session(), request_context(), [server]).get(server.id)
    return McpServerWithJob.model_validate(server).model_copy(
        update={"job": JobOut.model_validate(job) if job else None, "connection": state}
    )


@route(
    bp,
    "/orgs/<org>/mcp-servers",
    "GET",
    query=ListQuery,
    response=McpServerList,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def list_mcp_servers(access: OrgAccess, query: ListQuery) -> McpServerList:
    """List the org's MCP servers and their validation status."""
    page = McpServerList.model_validate(mcp.list_servers(session(), access, limit=query.limit, cursor=query.cursor))
    rows = mcp.servers_by_id(session(), access, [item.id for item in page.items])
    states = connections.for_caller(session(), request_context(), rows)
    page.items = [item.model_copy(update={"connection": states.get(item.id)}) for item in page.items]
    return page


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
    org_role="member",
)
def create_mcp_server(access: OrgAccess, body: McpServerCreate) -> Result:
    """Add an MCP server (binding a secret needs an org admin) and queue its validation."""
    server, job = mcp.create_server(session(), request_context(), access, body)
    return Result(_with_job(server, job), 201)


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>",
    "GET",
    response=McpServerOut,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def get_mcp_server(access: OrgAccess, server_id: str) -> McpServerOut:
    """One MCP server with its status and last validation error."""
    return _out(mcp.get_server(session(), access, server_id))


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>",
    "PATCH",
    body=McpServerUpdate,
    response=McpServerWithJob,
    tags=TAGS,
    errors=[401, 403, 404, 422, 503],
    org_role="member",
)
def update_mcp_server(access: OrgAccess, server_id: str, body: McpServerUpdate) -> McpServerWithJob:
    """Edit a server; a new URL, transport or secret re-validates it (admin when a secret is involved)."""
    server, job = mcp.update_server(session(), request_context(), access, server_id, body)
    return _with_job(server, job)


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404],
    org_role="member",
)
def delete_mcp_server(access: OrgAccess, server_id: str) -> None:
    """Delete a server and its tool list (admin when a secret is bound)."""
    mcp.delete_server(session(), request_context(), access, server_id)


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/validate",
    "POST",
    response=JobAccepted,
    status=202,
    tags=TAGS,
    errors=[401, 404, 503],
    org_role="member",
)
def validate_mcp_server(access: OrgAccess, server_id: str) -> Result:
    """Queue a validation: initialize + tools/list with the bound secret."""
    return accepted(mcp.request_validation(session(), request_context(), access, server_id))


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/tools",
    "GET",
    response=ToolList,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def list_mcp_tools(access: OrgAccess, server_id: str) -> ToolList:
    """The tools the server listed at its last successful validation."""
    tools = mcp.list_tools(session(), access, server_id)
    return ToolList(items=[ToolOut.model_validate(t) for t in tools])


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/connect",
    "POST",
    response=ConnectOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 502, 503],
    org_role="member",
)
def connect_mcp_server(access: OrgAccess, server_id: str) -> ConnectOut:
    """Start an OAuth connection: a worker prepares it and this answers the URL to send the user to.

    Per-user servers: any member connects themselves; org-wide: an org admin. The user approves
    at the authorization server and comes back to ``/oauth/callback`` (or an API client posts
    ``state`` and ``code`` to ``POST /api/v1/oauth/callback``). 503 ``worker_unavailable`` when
    no worker answers in time; 502 ``connect_failed`` when discovery or registration failed.
    """
    start = connections.connect(
        session(),
        request_context(),
        access,
        server_id,
        redis=current_app.extensions["latchkey.redis"],
        settings=current_app.config["LATCHKEY_SETTINGS"],
    )
    return ConnectOut(authorization_url=start.authorization_url, expires_at=start.expires_at)


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/connection",
    "GET",
    response=ConnectionOut,
    tags=TAGS,
    errors=[401, 404, 409],
    org_role="member",
)
def get_mcp_connection(access: OrgAccess, server_id: str) -> ConnectionOut:
    """The connection the caller's runs use on this server (theirs, or the org's)."""
    server = mcp.get_server(session(), access, server_id)
    state = connections.for_caller(session(), request_context(), [server]).get(server.id)
    if state is None:
        raise connections.OAuthNotConfiguredError("this MCP server has no connections")
    return state


@route(
    bp,
    "/orgs/<org>/mcp-servers/<server_id>/connection",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404, 409],
    org_role="member",
)
def disconnect_mcp_server(access: OrgAccess, server_id: str) -> None:
    """Disconnect: no run uses the connection from now on; a worker revokes and deletes its tokens."""
    connections.disconnect(session(), request_context(), access, server_id)


@route(
    bp,
    "/oauth/callback",
    "POST",
    body=CallbackIn,
    response=JobAccepted,
    status=202,
    tags=TAGS,
    errors=[400, 401, 403, 404, 422, 503],
)
def oauth_callback(body: CallbackIn) -> Result:
    """Complete an authorization begun by the caller: the code goes, sealed, to a worker.

    ``state`` must be one the caller began, unused and not expired (400 ``invalid_state``).
    """
    job, _server, _org = connections.complete(
        session(), request_context(), current_user(), _keys(), state=body.state, code=body.code
    )
    return accepted(job)
