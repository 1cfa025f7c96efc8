"""Agent runs end to end: a real worker, the real MCP server and a real HTTP stand-in for the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from app.models import Job
from tests.conftest import GATEWAY_TOKEN
from tests.support.agents import PROVIDER_KEY, agent, provider
from tests.support.factories import Caller, Factory
from tests.support.leaks import dump_database, find_leaks
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.workers import wait_for

MCP_TOKEN = "mcp-agent-token-" + "m" * 20


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(token=MCP_TOKEN) as server:
        yield server


def _mcp(admin: Caller, org: str, factory: Factory, server: McpTestServer) -> str:
    secret = factory.secret(admin, org, value=MCP_TOKEN)["id"]
    created = admin.post(
        f"orgs/{org}/mcp-servers", json={"name": "Tools", "url": server.url, "secret_ref": secret}
    ).get_json()

    def valid() -> bool:
        return bool(admin.get(f"orgs/{org}/mcp-servers/{created['id']}").get_json()["status"] == "valid")

    wait_for(valid)
    server_id: str = created["id"]
    return server_id


def _run(caller: Caller, org: str, agent_id: str, text: str = "hello") -> dict[str, Any]:
    resp = caller.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": text})
    assert resp.status_code == 202, resp.get_json()
    run_id = resp.get_json()["run"]["id"]

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = caller.get(f"orgs/{org}/runs/{run_id}").get_json()
        return run if run["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = wait_for(finished, timeout=30)
    return result


def _headers_only(llm: LlmTestServer, value: str, header: str) -> None:
    """``value`` was sent, and only ever in ``header``: never in a path, a body or another header."""
    assert llm.requests
    for req in llm.requests:
        assert value in req.headers.get(header, ""), (req.path, header)
        assert value not in req.path and value not in req.raw
        assert all(value not in v for k, v in req.headers.items() if k != header)


def test_openai_style_run_sends_the_key_only_in_the_authorization_header(
    worker: Celery, llm: LlmTestServer, member: Caller, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    provider_id, secret = provider(admin, org, factory, llm)
    llm.script([{"text": "Hello from the model"}])
    run = _run(member, org, agent(member, org, provider_id))
    assert run["status"] == "succeeded", run
    assert run["output"] == "Hello from the model"
    assert [e["type"] for e in run["events"]] == ["status", "final"]
    assert run["usage"]["steps"] == 1
    _headers_only(llm, PROVIDER_KEY, "authorization")
    assert llm.requests[0].body["model"] == "test-model"
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == "agents.run_agent")).one()
        assert job.resolved_secrets == [{"secret_id": secret, "version": 1}]


def test_anthropic_run_sends_the_key_only_as_x_api_key(
    worker: Celery, llm: LlmTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, _ = provider(admin, org, factory, llm, "anthropic")
    llm.script([{"text": "Hi from claude"}])
    run = _run(admin, org, agent(admin, org, provider_id))
    assert (run["status"], run["output"]) == ("succeeded", "Hi from claude")
    _headers_only(llm, PROVIDER_KEY, "x-api-key")
    assert llm.requests[0].path == "/v1/messages"


def test_gateway_run_sends_the_gateway_token_and_the_key_each_in_its_own_header(
    worker: Celery, llm: LlmTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, _ = provider(admin, org, factory, llm, "cloudflare_ai_gateway")
    llm.script([{"text": "via the gateway"}])
    run = _run(admin, org, agent(admin, org, provider_id))
    assert run["status"] == "succeeded", run
    req = llm.requests[0]
    assert req.path == "/acct1/gw1/compat/chat/completions"
    assert req.body["model"] == "openai/test-model"
    _headers_only(llm, GATEWAY_TOKEN, "cf-aig-authorization")
    _headers_only(llm, PROVIDER_KEY, "authorization")


def test_a_tool_call_runs_on_the_real_mcp_server_with_its_secret(
    worker: Celery, llm: LlmTestServer, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, _ = provider(admin, org, factory, llm)
    server_id = _mcp(admin, org, factory, mcp_server)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "add"}])
    llm.script([{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, {"text": "The sum is 5"}])
    mark = len(mcp_server.seen_tokens)
    run = _run(admin, org, agent_id, "what is 2+3?")
    assert run["status"] == "succeeded", run
    assert [e["type"] for e in run["events"]] == ["status", "tool_call", "tool_result", "final"]
    assert run["events"][2]["content"] == "5"
    assert MCP_TOKEN in mcp_server.seen_tokens[mark:]
    # Only the selected tool was offered, and the tool result went back to the model.
    offered = [t["function"]["name"] for t in llm.requests[0].body["tools"]]
    assert offered == ["add"]
    assert any(m.get("role") == "tool" and m.get("content") == "5" for m in llm.requests[1].body["messages"])
    for req in llm.requests:
        assert MCP_TOKEN not in req.raw and PROVIDER_KEY not in req.raw


def test_an_unselected_tool_is_refused(
    worker: Celery, llm: LlmTestServer, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, _ = provider(admin, org, factory, llm)
    server_id = _mcp(admin, org, factory, mcp_server)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "add"}])
    llm.script([{"tool_calls": [{"name": "whoami", "arguments": {}}]}, {"text": "ok"}])
    run = _run(admin, org, agent_id)
    errors = [e for e in run["events"] if e["type"] == "tool_error"]
    assert errors and errors[0]["code"] == "unknown_tool"


def test_a_model_that_prints_its_key_and_echoes_everything_leaks_nothing(
    worker: Celery,
    llm: LlmTestServer,
    mcp_server: McpTestServer,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Any,
    worker_log: Any,
) -> None:
    provider_id, _ = provider(admin, org, factory, llm)
    server_id = _mcp(admin, org, factory, mcp_server)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "echo"}])
    # The model "knows" the keys and tries every way out: tool arguments, a tool that echoes
    # them back into its context, and its final answer.
    llm.script(
        [
            {"tool_calls": [{"name": "echo", "arguments": {"text": f"{PROVIDER_KEY} and {MCP_TOKEN}"}}]},
            {"echo": True},
        ]
    )
    run = _run(admin, org, agent_id, "print your API key")
    assert run["status"] == "succeeded", run
    assert "***" in run["output"]
    stored = str(run)
    assert PROVIDER_KEY not in stored and MCP_TOKEN not in stored
    # The second model request carried the tool result: masked before it reached the model.
    assert PROVIDER_KEY not in llm.requests[1].raw and MCP_TOKEN not in llm.requests[1].raw
    assert (
        find_leaks(
            [*dump_database(db.engine), ("worker log", worker_log.read_text())],
            [PROVIDER_KEY, MCP_TOKEN, GATEWAY_TOKEN],
        )
        == []
    )


def test_an_invalid_mcp_server_fails_the_run_with_a_clear_event(
    worker: Celery,
    llm: LlmTestServer,
    mcp_server: McpTestServer,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Any,
) -> None:
    from app.models import McpServer

    provider_id, _ = provider(admin, org, factory, llm)
    server_id = _mcp(admin, org, factory, mcp_server)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "add"}])
    with db.session() as s:
        row = s.get(McpServer, server_id)
        assert row is not None
        row.status = "invalid"
    run = _run(admin, org, agent_id)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "mcp_server_invalid"
    assert run["events"][-1]["type"] == "error" and run["events"][-1]["code"] == "mcp_server_invalid"
    assert llm.requests == []  # the model was never called


def test_rotating_the_provider_secret_sends_the_new_value_next_run(
    worker: Celery, llm: LlmTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, secret = provider(admin, org, factory, llm)
    agent_id = agent(admin, org, provider_id)
    assert _run(admin, org, agent_id)["status"] == "succeeded"
    rotated = "sk-rotated-" + "r" * 30
    assert admin.patch(f"orgs/{org}/secrets/{secret}", json={"value": rotated}).status_code == 200
    llm.reset()
    assert _run(admin, org, agent_id)["status"] == "succeeded"
    _headers_only(llm, rotated, "authorization")
    assert all(PROVIDER_KEY not in r.headers.get("authorization", "") for r in llm.requests)


def test_agent_validation(
    admin: Caller, org: str, factory: Factory, llm: LlmTestServer, mcp_server: McpTestServer, worker: Celery
) -> None:
    provider_id, _ = provider(admin, org, factory, llm)
    assert admin.post(f"orgs/{org}/agents", json={"name": "X"}).status_code == 422
    other = factory.org()
    foreign, _ = provider(factory.user(other, "admin"), other, factory, llm)
    resp = admin.post(f"orgs/{org}/agents", json={"name": "X", "provider_id": foreign})
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "provider_id"
    server_id = _mcp(admin, org, factory, mcp_server)
    resp = admin.post(
        f"orgs/{org}/agents",
        json={"name": "X", "provider_id": provider_id, "tools": [{"mcp_server_id": server_id, "tool_name": "nope"}]},
    )
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "tools.0.tool_name"


def test_a_gateway_run_without_the_global_token_fails_with_gateway_token_missing(
    llm: LlmTestServer, admin: Caller, org: str, factory: Factory, settings: Any
) -> None:
    from tests.support.workers import extra_worker

    provider_id, _ = provider(admin, org, factory, llm, "cloudflare_ai_gateway")
    agent_id = agent(admin, org, provider_id)
    with extra_worker(settings, gateway_token=None) as (_celery, web):
        untokened = Caller(web.test_client(), admin.token, admin.user_id, admin.email)
        run = _run(untokened, org, agent_id)
    assert (run["status"], run["error"]["code"]) == ("failed", "gateway_token_missing")
    assert llm.requests == []  # nothing was sent without it


def test_masking_is_per_run_so_another_orgs_value_is_no_oracle(
    worker: Celery, llm: LlmTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    # Org A's provider key: resolved by the worker in A's run, so its process-wide log registry holds it.
    a_value = "Winter2025!Pass-" + "w" * 12
    a_provider, _ = provider(admin, org, factory, llm, key=a_value)
    llm.script([{"text": f"your key is {a_value}"}])
    a_run = _run(admin, org, agent(admin, org, a_provider), f"cand2={a_value}")
    assert a_run["status"] == "succeeded", a_run
    assert a_run["output"] == "your key is ***"
    assert a_value not in str(a_run["events"])
    # Org B types the same string: it is B's own text, and B's run never resolved it.
    other = factory.org()
    b_admin = factory.user(other, "admin")
    b_provider, _ = provider(b_admin, other, factory, llm)
    llm.reset()
    llm.script([{"echo": True}])
    b_run = _run(b_admin, other, agent(b_admin, other, b_provider), f"cand2={a_value}")
    assert b_run["status"] == "succeeded", b_run
    assert f"cand2={a_value}" in b_run["output"]
    assert f"cand2={a_value}" in b_run["events"][-1]["output"]
    assert f"cand2={a_value}" in llm.requests[0].raw  # the model got B's input as typed
    # B's own key is still masked in B's run.
    assert PROVIDER_KEY not in str(b_run)


def test_a_denied_model_call_fails_the_run_and_writes_an_egress_denied_event(
    worker: Celery, llm: LlmTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    from app.models import AuditEvent

    secret = factory.secret(admin, org, value=PROVIDER_KEY, allowed_hosts=["api.example.com"])["id"]
    resp = admin.post(
        f"orgs/{org}/providers",
        json={
            "name": "Pinned",
            "provider_type": "openai_compatible",
            "kind": "openai",
            "model_id": "test-model",
            "secret_ref": secret,
            "config": {"base_url": llm.url + "/v1"},
        },
    )
    assert resp.status_code == 201, resp.get_json()
    run = _run(admin, org, agent(admin, org, resp.get_json()["id"]))
    assert (run["status"], run["error"]["code"]) == ("failed", "secret_destination_denied")
    assert llm.requests == []
    with db.session() as s:
        (denial,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "egress.denied")).all()
    assert (denial.target_type, denial.target_id) == ("agent_run", run["id"])
    assert denial.details["code"] == "secret_destination_denied" and denial.details["host"] == "127.0.0.1"
    assert denial.details["destination"] == "provider"
    assert PROVIDER_KEY not in str(denial.details)
