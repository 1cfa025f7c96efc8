"""Agents (any member): a provider, a system prompt and selected tools; runs go to a worker."""

from __future__ import annotations

from pydantic import BaseModel

from app.access import OrgAccess
from app.agents import service as agents
from app.agents.schemas import AgentCreate, AgentList, AgentOut, AgentUpdate, RunCreate, RunOut
from app.api.blueprint import bp
from app.api.request import request_context, session
from app.api.routing import Result, route
from app.api.schemas import ListQuery
from app.jobs.schemas import JobOut

TAGS = ["agents"]


class RunAccepted(BaseModel):
    run: RunOut
    job: JobOut


@route(
    bp,
    "/orgs/<org>/agents",
    "GET",
    query=ListQuery,
    response=AgentList,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def list_agents(access: OrgAccess, query: ListQuery) -> AgentList:
    """List the org's agents."""
    return AgentList.model_validate(agents.list_agents(session(), access, limit=query.limit, cursor=query.cursor))


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
    org_role="member",
)
def create_agent(access: OrgAccess, body: AgentCreate) -> Result:
    """Create an agent: a provider of this org and tools of valid MCP servers."""
    return Result(AgentOut.model_validate(agents.create_agent(session(), request_context(), access, body)), 201)


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>",
    "GET",
    response=AgentOut,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def get_agent(access: OrgAccess, agent_id: str) -> AgentOut:
    """One agent."""
    return AgentOut.model_validate(agents.get_agent(session(), access, agent_id))


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>",
    "PATCH",
    body=AgentUpdate,
    response=AgentOut,
    tags=TAGS,
    errors=[401, 404, 422],
    org_role="member",
)
def update_agent(access: OrgAccess, agent_id: str, body: AgentUpdate) -> AgentOut:
    """Edit an agent (its tools are replaced when given)."""
    return AgentOut.model_validate(agents.update_agent(session(), request_context(), access, agent_id, body))


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def delete_agent(access: OrgAccess, agent_id: str) -> None:
    """Delete an agent and its runs."""
    agents.delete_agent(session(), request_context(), access, agent_id)


@route(
    bp,
    "/orgs/<org>/agents/<agent_id>/runs",
    "POST",
    body=RunCreate,
    response=RunAccepted,
    status=202,
    tags=TAGS,
    errors=[401, 404, 422, 503],
    org_role="member",
)
def start_run(access: OrgAccess, agent_id: str, body: RunCreate) -> Result:
    """Start a run; poll the run (or its job) for events and the output."""
    run, job = agents.start_run(session(), request_context(), access, agent_id, body)
    return Result(RunAccepted(run=RunOut.model_validate(run), job=JobOut.model_validate(job)), 202)


@route(
    bp,
    "/orgs/<org>/runs/<run_id>",
    "GET",
    response=RunOut,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def get_run(access: OrgAccess, run_id: str) -> RunOut:
    """A run: status, ordered events, output and usage (secrets masked)."""
    return RunOut.model_validate(agents.get_run(session(), access, run_id))
