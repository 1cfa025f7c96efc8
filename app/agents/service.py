"""Agents and their runs. An agent picks a provider (never a secret) and a selection of tools."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from app.access import OrgAccess
from app.agents.schemas import AgentCreate, AgentUpdate, RunCreate, ToolRef
from app.audit import service as audit
from app.context import RequestContext
from app.db import new_id, utcnow
from app.errors import NotFoundError, ValidationFailedError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.mcp.service import destination as mcp_destination
from app.models import Agent, AgentRun, AgentTool, Job, JobStatus, McpServer, McpServerStatus, McpTool, Org, Provider
from app.pagination import Page, paginate


def _provider(session: Session, org: Org, provider_id: str) -> Provider:
    provider: Provider | None = session.scalar(
        select(Provider).where(Provider.org_id == org.id, Provider.id == provider_id)
    )
    if provider is None:
        raise ValidationFailedError.single("provider_id", "no provider with this id in this org")
    return provider


def _tools(session: Session, org: Org, tools: list[ToolRef] | None) -> list[tuple[str, str]]:
    """Each selected tool must be in a valid server's stored tool list, in this org."""
    chosen: list[tuple[str, str]] = []
    for i, item in enumerate(tools or []):
        server_id, tool_name = item.mcp_server_id, item.tool_name
        server = session.scalar(select(McpServer).where(McpServer.org_id == org.id, McpServer.id == server_id))
        if server is None:
            raise ValidationFailedError.single(f"tools.{i}.mcp_server_id", "no MCP server with this id in this org")
        if server.status != McpServerStatus.VALID:
            raise ValidationFailedError.single(f"tools.{i}.mcp_server_id", f"the MCP server is {server.status}")
        known = session.scalar(select(McpTool.id).where(McpTool.mcp_server_id == server.id, McpTool.name == tool_name))
        if known is None:
            raise ValidationFailedError.single(f"tools.{i}.tool_name", "the server does not list this tool")
        if (server_id, tool_name) not in chosen:
            chosen.append((server_id, tool_name))
    return chosen


def list_agents(session: Session, access: OrgAccess, *, limit: int, cursor: str | None) -> Page[Agent]:
    """The org's agents with their tools (any member)."""
    # Legacy agents (no provider yet) are not usable until the backfill gives them one.
    stmt = (
        select(Agent)
        .where(Agent.org_id == access.org.id, Agent.provider_id.is_not(None))
        .options(selectinload(Agent.tools))
    )
    return paginate(session, stmt, Agent.id, limit=limit, cursor=cursor)


def get_agent(session: Session, access: OrgAccess, agent_id: str, *, legacy: bool = False) -> Agent:
    """An agent of the org; ``legacy`` also finds one the backfill could not give a provider.

    Such an agent can only be given a provider (PATCH) or deleted: that is how an operator
    settles the rows ``backfill run`` reports as failed before the contract migration.
    """
    stmt = select(Agent).where(Agent.org_id == access.org.id, Agent.id == agent_id)
    if not legacy:
        stmt = stmt.where(Agent.provider_id.is_not(None))
    agent: Agent | None = session.scalar(stmt)
    if agent is None:
        raise NotFoundError("agent not found")
    return agent


def _set_tools(session: Session, agent: Agent, chosen: list[tuple[str, str]]) -> None:
    session.execute(delete(AgentTool).where(AgentTool.agent_id == agent.id))
    for server_id, name in chosen:
        session.add(AgentTool(org_id=agent.org_id, agent_id=agent.id, mcp_server_id=server_id, tool_name=name))
    session.flush()
    session.expire(agent, ["tools"])


def create_agent(session: Session, ctx: RequestContext, access: OrgAccess, data: AgentCreate) -> Agent:
    """Create an agent on a provider of this org, with tools from valid MCP servers (any member)."""
    org = access.org
    provider = _provider(session, org, data.provider_id)
    chosen = _tools(session, org, data.tools)
    now = utcnow()
    agent = Agent(
        id=new_id(),
        org_id=org.id,
        name=data.name,
        provider_id=provider.id,
        model_id=data.model_id,
        system_prompt=data.system_prompt,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(agent)
    session.flush()
    _set_tools(session, agent, chosen)
    audit.record(
        session,
        ctx,
        "agent.create",
        org_id=org.id,
        target_type="agent",
        target_id=agent.id,
        details={"name": data.name, "provider_id": provider.id, "tools": [list(t) for t in chosen]},
    )
    return agent


def update_agent(session: Session, ctx: RequestContext, access: OrgAccess, agent_id: str, data: AgentUpdate) -> Agent:
    """Edit an agent (any member); given tools replace its selection."""
    org = access.org
    sent = data.model_dump(exclude_unset=True)
    agent = get_agent(session, access, agent_id, legacy=True)
    if agent.provider_id is None and "provider_id" not in sent:
        raise ValidationFailedError.single("provider_id", "this legacy agent has no provider yet: give it one")
    if "provider_id" in sent:
        sent["provider_id"] = _provider(session, org, sent["provider_id"]).id
    tools = _tools(session, org, data.tools) if "tools" in sent else None
    for key in ("name", "provider_id", "model_id", "system_prompt"):
        if key in sent:
            setattr(agent, key, sent[key])
    if tools is not None:
        _set_tools(session, agent, tools)
    agent.updated_at = utcnow()
    agent.updated_by = ctx.actor.id
    session.flush()
    audit.record(
        session,
        ctx,
        "agent.update",
        org_id=org.id,
        target_type="agent",
        target_id=agent.id,
        details={"changed": list(sent)},
    )
    return agent


def delete_agent(session: Session, ctx: RequestContext, access: OrgAccess, agent_id: str) -> None:
    """Delete an agent and its runs (any member)."""
    org = access.org
    agent = get_agent(session, access, agent_id, legacy=True)
    session.execute(delete(AgentTool).where(AgentTool.agent_id == agent.id))
    session.execute(delete(AgentRun).where(AgentRun.agent_id == agent.id))
    session.delete(agent)
    session.flush()
    audit.record(
        session,
        ctx,
        "agent.delete",
        org_id=org.id,
        target_type="agent",
        target_id=agent_id,
        details={"name": agent.name},
    )


def provider_destination(provider: Provider) -> dict[str, Any]:
    """Where a run sends the provider's key: the fields that define the endpoint, never a value."""
    return {
        "provider_id": provider.id,
        "secret_ref": provider.secret_ref,
        "provider_type": provider.provider_type,
        "kind": provider.kind,
        "config": dict(provider.config or {}),  # base_url / account_id / gateway_id only
    }


def run_destinations(provider: Provider, servers: Iterable[McpServer]) -> dict[str, Any]:
    """Every destination a run may send a credential to: its provider and each selected tool's server.

    Recorded in the run's job params; the worker compares the rows with it before resolving any
    secret, and a run whose destinations changed since it was queued ends ``stale`` unsent.
    """
    unique = {server.id: server for server in servers}
    return {
        "provider": provider_destination(provider),
        "mcp_servers": [mcp_destination(unique[sid]) for sid in sorted(unique)],
    }


def load_destinations(session: Session, agent: Agent) -> tuple[Provider | None, list[McpServer]]:
    """The agent's provider and the servers of its selected tools, as they are now."""
    provider = session.scalar(select(Provider).where(Provider.org_id == agent.org_id, Provider.id == agent.provider_id))
    servers = session.scalars(
        select(McpServer)
        .join(AgentTool, (AgentTool.mcp_server_id == McpServer.id) & (AgentTool.org_id == McpServer.org_id))
        .where(AgentTool.agent_id == agent.id)
    ).all()
    return provider, list(servers)


def start_run(
    session: Session, ctx: RequestContext, access: OrgAccess, agent_id: str, data: RunCreate
) -> tuple[AgentRun, Job]:
    """Queue a run of the agent on ``data.input`` (any member; 202: the worker does the rest)."""
    org = access.org
    agent = get_agent(session, access, agent_id)
    provider, servers = load_destinations(session, agent)
    if provider is None:
        raise NotFoundError("the agent's provider no longer exists")
    # Where the run may send credentials, as allowed now: the worker sends nowhere else.
    destinations = run_destinations(provider, servers)
    run = AgentRun(
        id=new_id(),
        org_id=org.id,
        agent_id=agent.id,
        status=JobStatus.QUEUED,
        input=data.input,
        events=[],
        created_by=ctx.actor.id,
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    params = {"run_id": run.id, **destinations}
    job = jobs.create_job(session, ctx, org_id=org.id, kind=TaskName.RUN_AGENT, params=params)
    run.job_id = job.id
    audit.record(
        session,
        ctx,
        "agent.run",
        org_id=org.id,
        target_type="agent_run",
        target_id=run.id,
        details={"agent_id": agent.id, "job_id": job.id},
    )
    return run, job


def recent_runs(session: Session, access: OrgAccess, agent_id: str, *, limit: int = 10) -> list[AgentRun]:
    """The agent's newest runs, newest first (ids are time-ordered)."""
    stmt = (
        select(AgentRun)
        .where(AgentRun.org_id == access.org.id, AgentRun.agent_id == agent_id)
        .order_by(AgentRun.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def get_run(session: Session, access: OrgAccess, run_id: str) -> AgentRun:
    """A run of the org (any member)."""
    stmt = select(AgentRun).where(AgentRun.org_id == access.org.id, AgentRun.id == run_id)
    run: AgentRun | None = session.scalar(stmt)
    if run is None:
        raise NotFoundError("run not found")
    return run
