"""The agent loop called directly (no Celery): the real model stand-in, a real database session."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy import select

from app.agents import runner
from app.config import Settings
from app.db import Database
from app.errors import WorkerError
from app.jobs.names import TaskName
from app.mcp import validation
from app.models import AgentRun, AuditEvent, Job, JobStatus
from app.tasks.runtime import JobView, WorkerContext
from tests.support.agents import PROVIDER_KEY, agent, provider
from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.unit.worker_support import parked_web, start_run, worker_ctx


@pytest.fixture
def web(settings: Settings) -> Iterator[Flask]:
    with parked_web(settings) as app:
        yield app


@pytest.fixture
def factory(db: Database, web: Flask) -> Factory:
    return Factory(db, web.test_client())


@pytest.fixture
def ctx(settings: Settings) -> Iterator[WorkerContext]:
    with worker_ctx(settings) as context:
        yield context


def _view(db: Database, run_id: str) -> JobView:
    """The run's job as a worker sees it once claimed (no lease: nothing to lose)."""
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == TaskName.RUN_AGENT)).one()
        assert job.params["run_id"] == run_id
        return JobView(job.id, job.org_id, job.kind, dict(job.params), attempts=1)


def _run_row(db: Database, run_id: str) -> AgentRun:
    with db.session() as s:
        row = s.get(AgentRun, run_id)
        assert row is not None
        s.expunge(row)
        return row


def test_a_run_stores_its_output_events_usage_and_reads(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin: Caller = factory.user(org, "admin")
    run_id = start_run(admin, org, agent(admin, org, provider(admin, org, factory, llm)[0]))
    llm.script([{"text": "Hello from the model"}])
    job = _view(db, run_id)

    assert runner.run(ctx, job) == {"run_id": run_id, "status": JobStatus.SUCCEEDED, "steps": 1}

    row = _run_row(db, run_id)
    assert (row.status, row.output, row.error_code) == (JobStatus.SUCCEEDED, "Hello from the model", None)
    assert [e["type"] for e in row.events] == ["status", "final"]
    assert row.usage is not None and row.usage["steps"] == 1
    assert row.finished_at is not None
    assert len(llm.requests) == 1
    assert PROVIDER_KEY in llm.requests[0].headers["authorization"]
    with db.session() as s:
        stored = s.get(Job, job.id)
        assert stored is not None and len(stored.resolved_secrets or []) == 1
        finished = s.scalars(select(AuditEvent).where(AuditEvent.action == "agent.run_finished")).one()
        assert finished.details["status"] == "succeeded" and finished.target_id == run_id


def test_a_value_the_model_echoes_is_masked_in_the_output_and_events(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    run_id = start_run(admin, org, agent(admin, org, provider(admin, org, factory, llm)[0]))
    llm.script([{"text": f"your key is {PROVIDER_KEY}"}])

    runner.run(ctx, _view(db, run_id))

    row = _run_row(db, run_id)
    assert row.output == "your key is ***"
    assert PROVIDER_KEY not in str(row.events)


def test_a_refused_provider_key_fails_the_run_with_the_providers_code(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    run_id = start_run(admin, org, agent(admin, org, provider(admin, org, factory, llm)[0]))
    llm.api_key = "some-other-key"

    with pytest.raises(WorkerError) as info:
        runner.run(ctx, _view(db, run_id))

    assert info.value.code == "provider_auth_failed"
    row = _run_row(db, run_id)
    assert (row.status, row.error_code) == (JobStatus.FAILED, "provider_auth_failed")
    assert row.events[-1]["type"] == "error" and row.events[-1]["code"] == "provider_auth_failed"
    assert row.error_message == info.value.message


def test_a_destination_changed_after_queueing_is_stale_and_nothing_is_sent(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    provider_id, _ = provider(admin, org, factory, llm)
    run_id = start_run(admin, org, agent(admin, org, provider_id))
    moved = admin.patch(f"orgs/{org}/providers/{provider_id}", json={"config": {"base_url": llm.url + "/v2"}})
    assert moved.status_code == 200, moved.get_json()

    with pytest.raises(WorkerError) as info:
        runner.run(ctx, _view(db, run_id))

    assert info.value.code == "stale"
    assert llm.requests == []
    row = _run_row(db, run_id)
    assert (row.status, row.error_code) == (JobStatus.FAILED, "stale")
    with db.session() as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "egress.stale")).one().target_id == run_id


def test_a_model_that_never_stops_calling_tools_ends_with_max_steps(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    run_id = start_run(admin, org, agent(admin, org, provider(admin, org, factory, llm)[0]))
    llm.script([{"tool_calls": [{"name": "nope", "arguments": {}}]}] * runner.MAX_STEPS)

    with pytest.raises(WorkerError) as info:
        runner.run(ctx, _view(db, run_id))

    assert info.value.code == "max_steps"
    row = _run_row(db, run_id)
    assert [e["code"] for e in row.events if e["type"] == "tool_error"] == ["unknown_tool"] * runner.MAX_STEPS
    assert len(llm.requests) == runner.MAX_STEPS


def test_a_run_queued_before_a_header_change_is_stale_and_no_tool_server_is_contacted(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    provider_id, _ = provider(admin, org, factory, llm)
    value = "runner-header-key-" + "r" * 16
    key = factory.secret(admin, org, value=value)["id"]
    with McpTestServer(require_headers={"X-API-Key": value}, bearer=False) as server:
        header = {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key}
        created = admin.post(
            f"orgs/{org}/mcp-servers", json={"name": "H", "url": server.url, "headers": [header]}
        ).get_json()
        with db.session() as s:
            queued = s.get(Job, created["job"]["id"])
            assert queued is not None
            view = JobView(queued.id, queued.org_id, queued.kind, dict(queued.params), attempts=1)
        assert validation.validate(ctx, view)["status"] == "valid"
        run_id = start_run(
            admin, org, agent(admin, org, provider_id, [{"mcp_server_id": created["id"], "tool_name": "echo"}])
        )
        changed = admin.patch(
            f"orgs/{org}/mcp-servers/{created['id']}", json={"headers": [{**header, "template": "k {{secret}}"}]}
        )
        assert changed.status_code == 200
        mark = len(server.seen_headers)

        with pytest.raises(WorkerError) as info:
            runner.run(ctx, _view(db, run_id))

        assert info.value.code == "stale" and "mcp_servers" in info.value.message
        assert server.seen_headers[mark:] == [] and llm.requests == []


def _valid_mcp(
    ctx: WorkerContext, db: Database, admin: Caller, org: str, factory: Factory, server: McpTestServer
) -> str:
    """An MCP server row for ``server`` (its bearer token in a secret), validated on ``ctx``; its id."""
    secret = factory.secret(admin, org, value=server.token)["id"]
    created = admin.post(
        f"orgs/{org}/mcp-servers",
        json={"name": f"S-{server.port}", "url": server.url, "transport": server.transport, "secret_ref": secret},
    ).get_json()
    with db.session() as s:
        queued = s.get(Job, created["job"]["id"])
        assert queued is not None
        view = JobView(queued.id, queued.org_id, queued.kind, dict(queued.params), attempts=1)
    assert validation.validate(ctx, view)["status"] == "valid"
    server_id: str = created["id"]
    return server_id


def _closed(server: McpTestServer) -> bool:
    deadline = time.monotonic() + 3
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.open_connections() == 0 and server.open_streams() == 0


def test_a_runs_tool_calls_use_one_session_per_server_closed_when_it_ends(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    provider_id, _ = provider(admin, org, factory, llm)
    with McpTestServer(legacy=True) as first, McpTestServer(transport="sse") as second:
        tools = [
            {"mcp_server_id": _valid_mcp(ctx, db, admin, org, factory, first), "tool_name": "add"},
            {"mcp_server_id": _valid_mcp(ctx, db, admin, org, factory, second), "tool_name": "echo"},
        ]
        run_id = start_run(admin, org, agent(admin, org, provider_id, tools))
        add = {"name": "add", "arguments": {"a": 2, "b": 3}}
        echo = {"name": "echo", "arguments": {"text": "hi"}}
        llm.script([{"tool_calls": [add, echo]}, {"tool_calls": [add]}, {"tool_calls": [add, echo]}, {"text": "done"}])
        marks = (first.handshakes(), second.handshakes())
        calls = (first.methods().count("tools/call"), second.methods().count("tools/call"))

        assert runner.run(ctx, _view(db, run_id))["status"] == JobStatus.SUCCEEDED

        row = _run_row(db, run_id)
        assert [e["type"] for e in row.events].count("tool_result") == 5
        assert first.methods().count("tools/call") - calls[0] == 3
        assert second.methods().count("tools/call") - calls[1] == 2
        # One handshake per server for the whole run: two servers, two sessions.
        assert (first.handshakes() - marks[0], second.handshakes() - marks[1]) == (1, 1)
        # Both ended with the run: the session id with a DELETE, the SSE stream, every connection.
        assert first.requests[-1] == ("DELETE", None)
        assert _closed(first) and _closed(second)
        assert not [t for t in threading.enumerate() if t.name == "latchkey-mcp-session"]


def test_a_failed_run_closes_its_sessions_too(
    ctx: WorkerContext, db: Database, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    provider_id, _ = provider(admin, org, factory, llm)
    with McpTestServer(legacy=True) as server:
        tools = [{"mcp_server_id": _valid_mcp(ctx, db, admin, org, factory, server), "tool_name": "add"}]
        run_id = start_run(admin, org, agent(admin, org, provider_id, tools))
        llm.script([{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}] * runner.MAX_STEPS)
        mark = server.handshakes()

        with pytest.raises(WorkerError) as info:
            runner.run(ctx, _view(db, run_id))

        assert info.value.code == "max_steps"
        assert server.handshakes() - mark == 1
        assert server.methods().count("tools/call") >= runner.MAX_STEPS
        assert server.requests[-1] == ("DELETE", None)
        assert _closed(server)
