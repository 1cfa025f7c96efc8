"""Agent pages: create (provider required, an MCP server then its tools), start a run, watch its events."""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, request, url_for
from sqlalchemy import select

from app.access import OrgAccess
from app.agents import service as agents
from app.agents.schemas import AgentCreate, RunCreate
from app.api.request import request_context
from app.errors import NotFoundError, ValidationFailedError
from app.mcp import connections
from app.mcp import service as mcp
from app.models import Agent, AgentRun, JobStatus, McpServerStatus, McpTool
from app.providers import service as providers
from app.schemas import validated
from app.web.forms import form_errors
from app.web.pages import db, page

FIELDS = ("name", "provider_id", "model_id", "system_prompt", "tools", "input")
# Run statuses that will still change: the events fragment keeps polling while in one.
RUNNING = (JobStatus.QUEUED, JobStatus.RUNNING)


def _form() -> dict[str, Any]:
    return {
        "name": request.form.get("name", "").strip(),
        "provider_id": request.form.get("provider_id", ""),
        "model_id": request.form.get("model_id", "").strip(),
        "system_prompt": request.form.get("system_prompt", ""),
        "mcp_server": request.form.get("mcp_server", ""),
        "tools": request.form.getlist("tools"),
    }


def _tool_refs(values: list[str]) -> list[dict[str, str]]:
    """Checkbox values ``<server id>|<tool name>`` as the model's tool references."""
    refs = []
    for value in values:
        server_id, sep, tool = value.partition("|")
        if sep:
            refs.append({"mcp_server_id": server_id, "tool_name": tool})
    return refs


def _render(access: OrgAccess, form: dict[str, Any], errors: dict[str, str]) -> str:
    servers = [
        s for s in mcp.list_servers(db(), access, limit=200, cursor=None).items if s.status == McpServerStatus.VALID
    ]
    tools: dict[str, list[McpTool]] = {s.id: [] for s in servers}
    if servers:
        for tool in db().scalars(
            select(McpTool)
            .where(McpTool.org_id == access.org.id, McpTool.mcp_server_id.in_(list(tools)))
            .order_by(McpTool.name)
        ):
            tools[tool.mcp_server_id].append(tool)
    return render_template(
        "agents/form.html",
        form=form,
        errors=errors,
        provider_options=providers.list_providers(db(), access, limit=200, cursor=None).items,
        servers=servers,
        tools=tools,
    )


@page("/orgs/<org>/agents", org_role="member")
def list_agents(access: OrgAccess) -> str:
    """The org's agents."""
    items = agents.list_agents(db(), access, limit=200, cursor=None).items
    names = {p.id: p.name for p in providers.list_providers(db(), access, limit=200, cursor=None).items}
    return render_template("agents/list.html", items=items, provider_names=names)


@page("/orgs/<org>/agents/new", ["GET", "POST"], org_role="member")
def new_agent(access: OrgAccess) -> Any:
    """Create an agent (any member): a provider of this org and tools of valid MCP servers."""
    if request.method == "GET":
        return _render(access, {"tools": []}, {})
    form = _form()
    values = {key: form[key] for key in ("name", "provider_id", "model_id", "system_prompt")}
    try:
        data = validated(
            AgentCreate, {**values, "tools": _tool_refs(form["tools"])}, blank_is_none=("model_id", "system_prompt")
        )
        agent = agents.create_agent(db(), request_context(), access, data)
    except ValidationFailedError as exc:
        db().rollback()
        return _render(access, form, form_errors(exc, FIELDS)), exc.status
    flash(f"Agent {agent.name} created.", "success")
    return redirect(url_for("web.agent_detail", org=access.org.slug, agent_id=agent.id))


def _run_of(access: OrgAccess, agent: Agent, run_id: str | None) -> AgentRun | None:
    if not run_id:
        return None
    run = agents.get_run(db(), access, run_id)
    if run.agent_id != agent.id:
        raise NotFoundError("run not found")
    return run


def _connect_offers(access: OrgAccess, run: AgentRun | None) -> list[tuple[Any, Any]]:
    """A run that ended ``auth_required``: the agent's OAuth servers the caller is not connected to."""
    if run is None or run.error_code != "auth_required":
        return []
    agent = agents.get_agent(db(), access, run.agent_id)
    _provider, servers = agents.load_destinations(db(), agent)
    states = connections.for_caller(db(), request_context(), servers)
    offers = []
    for server in servers:
        state = states.get(server.id)
        if state is not None and state.status != "connected":
            offers.append((server, state))
    return offers


@page("/orgs/<org>/agents/<agent_id>", org_role="member")
def agent_detail(access: OrgAccess, agent_id: str) -> str:
    """An agent: its settings and tools, a form to start a run, and the run's events as they arrive."""
    agent = agents.get_agent(db(), access, agent_id)
    provider = providers.get_provider(db(), access, agent.provider_id or "")
    run = _run_of(access, agent, request.args.get("run"))
    return render_template(
        "agents/detail.html",
        agent=agent,
        provider=provider,
        run=run,
        runs=agents.recent_runs(db(), access, agent.id),
        running=RUNNING,
        connect_offers=_connect_offers(access, run),
        errors={},
        form={},
    )


@page("/orgs/<org>/agents/<agent_id>/runs", ["POST"], org_role="member")
def start_run(access: OrgAccess, agent_id: str) -> Any:
    """Start a run and show it on the agent's page."""
    text = request.form.get("input", "")
    try:
        data = validated(RunCreate, {"input": text})
        run, _job = agents.start_run(db(), request_context(), access, agent_id, data)
    except ValidationFailedError as exc:
        db().rollback()
        agent = agents.get_agent(db(), access, agent_id)
        page_ = render_template(
            "agents/detail.html",
            agent=agent,
            provider=providers.get_provider(db(), access, agent.provider_id or ""),
            run=None,
            running=RUNNING,
            errors=form_errors(exc, FIELDS),
            form={"input": text},
        )
        return page_, exc.status
    return redirect(url_for("web.agent_detail", org=access.org.slug, agent_id=agent_id, run=run.id))


@page("/orgs/<org>/runs/<run_id>/events", org_role="member")
def run_events(access: OrgAccess, run_id: str) -> str:
    """A run's status, events and output (a fragment the agent page polls until the run ends)."""
    run = agents.get_run(db(), access, run_id)
    return render_template("agents/_run.html", run=run, running=RUNNING, connect_offers=_connect_offers(access, run))


@page("/orgs/<org>/agents/<agent_id>/delete", ["POST"], org_role="member")
def delete_agent(access: OrgAccess, agent_id: str) -> Any:
    """Delete an agent and its runs."""
    agents.delete_agent(db(), request_context(), access, agent_id)
    flash("Agent deleted.", "success")
    return redirect(url_for("web.list_agents", org=access.org.slug))
