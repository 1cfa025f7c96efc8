"""Agents (any member): a provider, a system prompt and selected tools; runs go to a worker."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.agents import service as agents
from app.api import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import ListQuery
from app.identity.access import org_access as access_of
from app.jobs.schemas import JobOut
from app.models import Agent, AgentRun
from app.schemas import Strict

TAGS = ["agents"]


class ToolRef(Strict):
    mcp_server_id: str
    tool_name: str


class AgentCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    provider_id: str = Field(description="A provider of this org (required).")
    model_id: str | None = Field(default=None, max_length=200, description="Overrides the provider's model.")
    system_prompt: str | None = Field(default=None, max_length=20_000)
    tools: list[ToolRef] | None = Field(default=None, max_length=64)


class AgentUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    provider_id: str | None = None
    model_id: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=20_000)
    tools: list[ToolRef] | None = Field(default=None, max_length=64)


class AgentOut(BaseModel):
    id: str
    name: str
    provider_id: str
    model_id: str | None
    system_prompt: str | None
    tools: list[ToolRef]
    created_at: datetime
    updated_at: datetime


class AgentList(BaseModel):
    items: list[AgentOut]
    next_cursor: str | None


class RunCreate(Strict):
    input: str = Field(min_length=1, max_length=32_000)


class RunOut(BaseModel):
    id: str
    agent_id: str
    status: str = Field(description="queued | running | succeeded | failed")
    input: str
    output: str | None
    events: list[dict[str, Any]] = Field(
        description="Ordered: status, tool_call, tool_result, tool_error, final, error."
    )
    usage: dict[str, Any] | None
    error: dict[str, str] | None
    created_at: datetime
    finished_at: datetime | None


class RunAccepted(BaseModel):
    run: RunOut
    job: JobOut


def agent_out(agent: Agent, tools: list[tuple[str, str]]) -> AgentOut:
    assert agent.provider_id is not None
    return AgentOut(
        id=agent.id,
        name=agent.name,
        provider_id=agent.provider_id,
        model_id=agent.model_id,
        system_prompt=agent.system_prompt,
        tools=[ToolRef(mcp_server_id=s, tool_name=t) for s, t in tools],
        created_at=agent.created_at,
        updated_at=agent.updated_at,
    )


def run_out(run: AgentRun) -> RunOut:
    error = {"code": run.error_code, "message": run.error_message or ""} if run.error_code else None
    return RunOut(
        id=run.id,
        agent_id=run.agent_id,
        status=run.status,
        input=run.input,
        output=run.output,
        events=run.events or [],
        usage=run.usage,
        error=error,
        created_at=run.created_at,
        finished_at=run.finished_at,
    )


def _fields(body: BaseModel) -> dict[str, Any]:
    out = {name: getattr(body, name) for name in body.model_fields_set}
    if out.get("tools") is not None:
        out["tools"] = [t.model_dump() for t in out["tools"]]
    return out


def _one(agent: Agent) -> AgentOut:
    return agent_out(agent, agents.tools_of(session(), [agent.id])[agent.id])


@route(bp, "/orgs/<org>/agents", "GET", query=ListQuery, response=AgentList, tags=TAGS, errors=[401, 404])
def list_agents(org: str, query: ListQuery) -> AgentList:
    """List the org's agents."""
    access = access_of(session(), current_user(), org)
    page = agents.list_agents(session(), access.org, limit=query.limit, cursor=query.cursor)
    tools = agents.tools_of(session(), [a.id for a in page.items])
    return AgentList(items=[agent_out(a, tools[a.id]) for a in page.items], next_cursor=page.next_cursor)


@route(
    bp,
    "/orgs/<org>/agents",
    "POST",
    body=AgentCreate,
    response=AgentOut,
    status=201,
    tags=TAGS,
    errors=[401, 404, 422],
    idempotent=True,
)
def create_agent(org: str, body: AgentCreate) -> Result:
    """Create an agent: a provider of this org and tools of valid MCP servers."""
    access = access_of(session(), current_user(), org)
    return Result(_one(agents.create_agent(session(), request_context(), access.org, _fields(body))), 201)


@route(bp, "/orgs/<org>/agents/<agent_id>", "GET", response=AgentOut, tags=TAGS, errors=[401, 404])
def get_agent(org: str, agent_id: str) -> AgentOut:
    """One agent."""
    access = access_of(session(), current_user(), org)
    return _one(agents.get_agent(session(), access.org, agent_id))


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>",
    "PATCH",
    body=AgentUpdate,
    response=AgentOut,
    tags=TAGS,
    errors=[401, 404, 422],
)
def update_agent(org: str, agent_id: str, body: AgentUpdate) -> AgentOut:
    """Edit an agent (its tools are replaced when given)."""
    access = access_of(session(), current_user(), org)
    return _one(agents.update_agent(session(), request_context(), access.org, agent_id, _fields(body)))


@route(bp, "/orgs/<org>/agents/<agent_id>", "DELETE", status=204, tags=TAGS, errors=[401, 404])
def delete_agent(org: str, agent_id: str) -> None:
    """Delete an agent and its runs."""
    access = access_of(session(), current_user(), org)
    agents.delete_agent(session(), request_context(), access.org, agent_id)


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>/runs",
    "POST",
    body=RunCreate,
    response=RunAccepted,
    status=202,
    tags=TAGS,
    errors=[401, 404, 422, 503],
)
def start_run(org: str, agent_id: str, body: RunCreate) -> Result:
    """Start a run; poll the run (or its job) for events and the output."""
    access = access_of(session(), current_user(), org)
    run, job = agents.start_run(session(), request_context(), access.org, agent_id, body.input)
    return Result(RunAccepted(run=run_out(run), job=JobOut.model_validate(job)), 202)


@route(bp, "/orgs/<org>/runs/<run_id>", "GET", response=RunOut, tags=TAGS, errors=[401, 404])
def get_run(org: str, run_id: str) -> RunOut:
    """A run: status, ordered events, output and usage (secrets masked)."""
    access = access_of(session(), current_user(), org)
    return run_out(agents.get_run(session(), access.org, run_id))
