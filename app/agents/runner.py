"""Agent runs: the model and tool loop, with credentials only in request headers.

Runs in a worker (``app.tasks.agents`` hands it the job), and anywhere that can give it a
database, settings, a resolver and the job: the tests call it directly.

Before anything is resolved, the rows are compared with the destinations recorded when the run
was queued (provider endpoint and key, each tool server's URL and secret): a run whose
destinations changed since ends ``stale`` and sends nothing. The provider key and each MCP
server's credentials (its bearer secret and header secrets, ``app.mcp.credentials``) are then
resolved here, once per run, and go only into HTTP headers (model calls through the egress
guard, tool calls through the MCP client). The model sees the system prompt, the user's
input, and tool results, all passed through the run's own masker first; the stored output,
events and errors are masked too. That masker holds only the values resolved in this run (and
the worker's gateway token), never the process-wide registry of every org's values: masking
must not tell one org that a string it typed is another org's secret.

Tool calls reuse one MCP session per server per run (``app.mcp.client.McpSession``): opened at
the server's first tool call, closed when the run ends however it ends. A session belongs to its
run alone (its headers are this run's credentials), so it is never shared across runs, orgs or users.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import select

from app.agents import service as agents_service
from app.agents.llm import Message, ModelTurn, ToolCall, ToolSpec, complete, endpoint_for
from app.audit import service as audit
from app.context import Actor, RequestContext
from app.db import utcnow
from app.egress import EgressError, EgressPolicy, guarded_async_client, guarded_client
from app.egress import audit as egress_audit
from app.errors import WorkerError
from app.jobs import service as jobs
from app.jobs.context import RunJob, Worker
from app.mcp import grants
from app.mcp.client import McpError, McpSession
from app.mcp.credentials import HeaderSpec, ServerCredentials, header_specs, server_credentials
from app.models import Agent, AgentRun, AgentTool, JobStatus, McpServer, McpServerStatus, McpTool, Provider
from app.observability import redact
from app.secrets.resolver import SecretNotFoundError

log = logging.getLogger("latchkey.agents")
WORKER = RequestContext(Actor("worker"))
MAX_STEPS = 10
_TOOL_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")
MAX_TOOL_RESULT = 20_000


class RunFailedError(WorkerError):
    """The run ends failed with this code (the run row and the job record the same error)."""


@dataclass(frozen=True)
class BoundTool:
    server_id: str
    url: str
    transport: str
    headers: tuple[HeaderSpec, ...]
    status: McpServerStatus
    spec: ToolSpec
    tool_name: str
    # The row itself (detached), for the server's auth: an OAuth server's token is the connection's.
    server: McpServer


@dataclass
class RunState:
    org_id: str
    run_id: str
    job: RunJob
    # Who started the run: a per-user OAuth server is called with this user's connection, never another's.
    user_id: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    reads: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "steps": 0})
    # The values resolved in this run (and the gateway token): all that its readable output is masked with.
    masker: redact.Registry = field(default_factory=redact.Registry)
    # secret id -> what it resolved to, for the tool calls.
    resolved: dict[str, Any] = field(default_factory=dict)
    # MCP server id -> the headers and host rules of its tool calls, built once per run.
    credentials: dict[str, ServerCredentials] = field(default_factory=dict)
    # MCP server id -> the run's open session to it (opened at its first tool call, closed when the run ends).
    sessions: dict[str, McpSession] = field(default_factory=dict)

    def event(self, kind: str, **data: Any) -> None:
        # Masked on the way in: nothing that reaches the run row can carry a value of this run.
        self.events.append({"type": kind, "at": utcnow().isoformat(), **self.mask(data)})

    def mask(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.masker.redact(value)
        if isinstance(value, dict):
            return {k: self.mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.mask(v) for v in value]
        return value


def _load(ctx: Worker, job: RunJob) -> tuple[AgentRun, Agent, Provider, list[BoundTool], list[str]]:
    """The run and what it uses, and the destinations that changed since it was queued (if any)."""
    run_id = str(job.params.get("run_id", ""))
    with ctx.db.session() as s:
        run = s.scalar(select(AgentRun).where(AgentRun.org_id == job.org_id, AgentRun.id == run_id))
        if run is None:
            raise RunFailedError("not_found", "the run no longer exists")
        agent = s.scalar(select(Agent).where(Agent.org_id == run.org_id, Agent.id == run.agent_id))
        provider = (
            s.scalar(select(Provider).where(Provider.org_id == run.org_id, Provider.id == agent.provider_id))
            if agent is not None
            else None
        )
        if agent is None or provider is None:
            raise RunFailedError("not_found", "the agent or its provider no longer exists")
        rows = s.execute(
            select(AgentTool, McpServer, McpTool)
            .join(McpServer, (McpServer.id == AgentTool.mcp_server_id) & (McpServer.org_id == AgentTool.org_id))
            .outerjoin(McpTool, (McpTool.mcp_server_id == McpServer.id) & (McpTool.name == AgentTool.tool_name))
            .where(AgentTool.agent_id == agent.id)
            .order_by(AgentTool.id)
        ).all()
        tools: list[BoundTool] = []
        taken: set[str] = set()
        for link, server, tool in rows:
            # The name the model sees: in the character set model APIs accept, and made unique
            # when two servers offer the same tool name.
            exposed = _TOOL_NAME_BAD.sub("_", link.tool_name)[:56] or "tool"
            if exposed in taken:
                exposed = f"{exposed}__{server.id[-6:]}"
            taken.add(exposed)
            spec = ToolSpec(exposed, tool.description if tool else None, tool.input_schema if tool else {})
            tools.append(
                BoundTool(
                    server.id,
                    server.url,
                    server.transport,
                    header_specs(server),
                    server.status,
                    spec,
                    link.tool_name,
                    server,
                )
            )
        current = agents_service.run_destinations(provider, [server for _link, server, _tool in rows])
        recorded = {key: job.params.get(key) for key in current}
        changed = egress_audit.changed_fields(recorded, current)
        run.status = JobStatus.RUNNING
        s.flush()
        s.expunge_all()
    return run, agent, provider, tools, changed


def _resolve(ctx: Worker, state: RunState, secret_id: str) -> Any:
    """Resolve once per run; the value joins the run's masker (the resolver adds it to the logs' one)."""
    resolved = state.resolved.get(secret_id)
    if resolved is None:
        resolved = state.resolved[secret_id] = ctx.resolver.resolve(state.org_id, secret_id)
        state.reads.append({"secret_id": resolved.secret_id, "version": resolved.version})
        state.masker.register(resolved.value)
    return resolved


def _tool_result_text(content: list[dict[str, Any]], structured: Any) -> str:
    parts = [c.get("text", "") for c in content if c.get("type") == "text"]
    text = "\n".join(p for p in parts if p) or (json.dumps(structured) if structured is not None else "")
    return text[:MAX_TOOL_RESULT]


def _credentials(ctx: Worker, state: RunState, tool: BoundTool, *, force_refresh: bool = False) -> ServerCredentials:
    """The tool's server's headers and host rules; its secrets resolved once per run (and so in the masker)."""
    creds = state.credentials.get(tool.server_id)
    if creds is None or force_refresh:
        resolve = partial(_resolve, ctx, state)
        creds = server_credentials(ctx, tool.server, state.user_id, resolve, tool.headers, force_refresh=force_refresh)
        for value in creds.values:  # a connection's token is not resolved through _resolve
            state.masker.register(value)
        state.reads.extend(r for r in creds.reads if r not in state.reads)
        state.credentials[tool.server_id] = creds
    return creds


def _session(ctx: Worker, state: RunState, tool: BoundTool, creds: ServerCredentials) -> McpSession:
    """The run's session to the tool's server, made at its first tool call (it connects at its first request)."""
    session = state.sessions.get(tool.server_id)
    if session is None:
        factory = partial(guarded_async_client, EgressPolicy.from_settings(ctx.settings), host_rules=creds.host_rules)
        session = state.sessions[tool.server_id] = McpSession(
            tool.url,
            transport=tool.transport,
            headers=creds.headers,
            http_client_factory=factory,
            timeout=ctx.settings.mcp_timeout_seconds,
        )
    return session


def _close_session(state: RunState, server_id: str) -> None:
    session = state.sessions.pop(server_id, None)
    if session is not None:
        session.close()


@contextmanager
def _sessions_closed(state: RunState) -> Iterator[None]:
    """Close every MCP session the run opened when it ends: success, failure, an exception or a lost lease."""
    try:
        yield
    finally:
        for server_id in list(state.sessions):
            _close_session(state, server_id)


def _run_tool(ctx: Worker, state: RunState, tool: BoundTool, arguments: dict[str, Any]) -> tuple[bool, str]:
    """Call one tool on its server's session with that server's credentials; (is_error, text for the model)."""
    oauth = tool.server.auth_type != "static"
    for attempt in (1, 2):
        creds = _credentials(ctx, state, tool, force_refresh=attempt == 2)
        try:
            result = _session(ctx, state, tool, creds).call_tool(tool.tool_name, arguments)
        except McpError as exc:
            # An OAuth token the server no longer takes (revoked or expired early): renew it once, on a
            # new session (a session's headers are fixed).
            if oauth and exc.code == "auth_failed" and attempt == 1:
                _close_session(state, tool.server_id)
                continue
            if oauth and exc.code == "insufficient_scope":
                # The next connect asks for what the server wanted too (a union, RFC 6750 §3.1).
                grants.want_scopes(ctx, tool.server, state.user_id, exc.scopes)
            raise
        return result.is_error, _tool_result_text(result.content, result.structured)
    raise AssertionError("unreachable")  # pragma: no cover


def _loop(ctx: Worker, state: RunState, agent: Agent, provider: Provider, tools: list[BoundTool], text: str) -> str:
    key = _resolve(ctx, state, provider.secret_ref)
    # Every secret the run may send is resolved up front, so that the run's masker knows each of
    # them from the first model turn on (and a missing one fails the run before the model is called).
    for bound in tools:
        _credentials(ctx, state, bound)
    gateway = ctx.settings.gateway_token.get_secret_value() if ctx.settings.gateway_token else None
    if gateway:
        redact.register(gateway)
        state.masker.register(gateway)
    endpoint = endpoint_for(
        provider.provider_type,
        provider.kind,
        agent.model_id or provider.model_id,
        provider.config,
        api_key=key.value,
        gateway_token=gateway,
        gateway_base_url=ctx.settings.ai_gateway_base_url,
    )
    by_name = {t.spec.name: t for t in tools}
    messages: list[Message] = []
    if agent.system_prompt:
        messages.append(Message("system", state.mask(agent.system_prompt)))
    messages.append(Message("user", state.mask(text)))
    with (
        guarded_client(EgressPolicy.from_settings(ctx.settings), key.allowed_hosts, timeout=60.0) as client,
        _sessions_closed(state),
    ):
        for _step in range(MAX_STEPS):
            # A worker that lost its lease (stalled past it; the job went to another worker) stops
            # before sending anything more: one run never calls the model from two workers.
            state.job.ensure_held()
            turn: ModelTurn = complete(endpoint, messages, [t.spec for t in tools], client=client)
            state.usage["input_tokens"] += turn.usage.get("input_tokens", 0)
            state.usage["output_tokens"] += turn.usage.get("output_tokens", 0)
            state.usage["steps"] += 1
            if not turn.tool_calls:
                output: str = state.mask(turn.text or "")
                state.event("final", output=output)
                return output
            # Arguments are masked before they go anywhere: to the tool, back to the model, or the log.
            calls = tuple(ToolCall(c.id, c.name, state.mask(c.arguments)) for c in turn.tool_calls)
            messages.append(Message("assistant", state.mask(turn.text) if turn.text else None, tool_calls=calls))
            for call in calls:
                state.event("tool_call", id=call.id, name=call.name, arguments=call.arguments)
                tool = by_name.get(call.name)
                if tool is None:
                    # Only selected tools are offered; anything else is refused, not forwarded.
                    state.event(
                        "tool_error",
                        id=call.id,
                        name=call.name,
                        code="unknown_tool",
                        message="the agent has no such tool",
                    )
                    messages.append(Message("tool", "error: no such tool", tool_call_id=call.id, name=call.name))
                    continue
                try:
                    state.job.ensure_held()
                    is_error, result = _run_tool(ctx, state, tool, call.arguments)
                except WorkerError as exc:  # a failed tool call (MCP, egress) is the model's to hear about
                    if isinstance(exc, EgressError):
                        egress_audit.denied(
                            ctx.db,
                            state.job.id,
                            exc,
                            org_id=state.org_id,
                            target_type="agent_run",
                            target_id=state.run_id,
                            destination="mcp_server",
                            server_id=tool.server_id,
                        )
                    state.event("tool_error", id=call.id, name=call.name, code=exc.code, message=exc.message)
                    messages.append(Message("tool", f"error: {exc.code}", tool_call_id=call.id, name=call.name))
                    continue
                masked = state.mask(result)
                state.event("tool_error" if is_error else "tool_result", id=call.id, name=call.name, content=masked)
                messages.append(Message("tool", masked, tool_call_id=call.id, name=call.name))
    raise RunFailedError("max_steps", f"the agent did not finish within {MAX_STEPS} steps")


def run(ctx: Worker, job: RunJob) -> dict[str, Any]:
    """Run the job's agent run: resolve its provider's key, loop model turns and tool calls, store masked events.

    The run row and the audit event record the outcome; a failure is raised (``WorkerError``)
    with the code and masked message the run row got, for the job to record too.
    """
    run, agent, provider, tools, changed = _load(ctx, job)
    state = RunState(run.org_id, run.id, job, user_id=run.created_by)
    state.event("status", status=JobStatus.RUNNING)
    output: str | None = None
    code: str | None = None
    message: str | None = None
    invalid = [t for t in tools if t.status != McpServerStatus.VALID]
    try:
        if changed:
            # Checked before anything is resolved: nothing is sent to a destination set after queueing.
            raise egress_audit.stale(
                ctx.db,
                job.id,
                job.kind,
                changed,
                org_id=run.org_id,
                target_type="agent_run",
                target_id=run.id,
                what="this run's agent",
            )
        if invalid:
            raise RunFailedError("mcp_server_invalid", f"MCP server {invalid[0].server_id} is {invalid[0].status}")
        output = _loop(ctx, state, agent, provider, tools, run.input)
    except WorkerError as exc:  # the resolver, the model call, the egress guard, or the run's own checks
        code, message = exc.code, exc.message
        if isinstance(exc, SecretNotFoundError):
            message = "a secret the run needs no longer exists"
        elif isinstance(exc, EgressError):
            # Tool calls report their own egress refusals to the model; this one was the provider's.
            egress_audit.denied(
                ctx.db,
                job.id,
                exc,
                org_id=run.org_id,
                target_type="agent_run",
                target_id=run.id,
                destination="provider",
                provider_id=provider.id,
            )
    if code is not None:
        state.event("error", code=code, message=message or "")
    status = JobStatus.FAILED if code else JobStatus.SUCCEEDED
    with ctx.db.session() as s:
        # The outcome is written only while this worker holds the job (the row lock keeps it so
        # for this transaction): a worker that lost its lease never overwrites the new holder's run.
        job.ensure_held(s)
        row = s.scalar(select(AgentRun).where(AgentRun.id == run.id).with_for_update())
        if row is not None:
            row.status = status
            row.output = output
            row.events = state.events
            row.usage = state.usage
            row.error_code = code
            row.error_message = state.mask(message)[:1000] if message else None
            row.finished_at = utcnow()
        jobs.record_resolved(s, job.id, state.reads)
        audit.record(
            s,
            WORKER,
            "agent.run_finished",
            org_id=run.org_id,
            target_type="agent_run",
            target_id=run.id,
            details={"job_id": job.id, "status": status, "error_code": code, "secrets": state.reads},
        )
    if code is not None:
        raise RunFailedError(code, state.mask(message or code))
    return {"run_id": run.id, "status": status, "steps": state.usage["steps"]}
