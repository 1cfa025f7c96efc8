"""Header credentials end to end: API -> broker -> a real worker -> a real MCP server that needs the headers.

The server answers 401 unless every request carries ``X-API-Key: <key>`` and ``Authorization:
token <token>`` (two secrets); it records every request's headers, so "nothing was sent" is
checked on what it actually received.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from app.models import AuditEvent, Job
from tests.support.agents import PROVIDER_KEY, agent, provider
from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.workers import wait_for, wait_job

KEY = "hdr-api-key-" + "k" * 24
TOKEN = "hdr-gh-token-" + "t" * 24


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(require_headers={"X-API-Key": KEY, "Authorization": f"token {TOKEN}"}, bearer=False) as server:
        yield server


def _settle(caller: Caller, org: str, server_id: str, timeout: float = 20) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = caller.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()
        return body if body["status"] in ("valid", "invalid") else None

    result: dict[str, Any] = wait_for(done, timeout)
    return result


def _add(admin: Caller, org: str, url: str, key_ref: str, token_ref: str) -> dict[str, Any]:
    headers = [
        {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key_ref},
        {"name": "Authorization", "template": "token {{secret}}", "secret_ref": token_ref},
    ]
    resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": "Headers", "url": url, "headers": headers})
    assert resp.status_code == 201, resp.get_json()
    created: dict[str, Any] = resp.get_json()
    return created


def _carrying(server: McpTestServer, mark: int, *values: str) -> list[dict[str, str]]:
    """The requests since ``mark`` that carried any of ``values`` in any header."""
    return [h for h in server.seen_headers[mark:] if any(v in text for v in values for text in h.values())]


def test_a_server_needing_two_header_secrets_is_valid_with_its_tools(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    allowed = [f"127.0.0.1:{mcp_server.port}"]
    key = factory.secret(admin, org, name="API_KEY", value=KEY, allowed_hosts=allowed)["id"]
    tok = factory.secret(admin, org, name="GH_TOKEN", value=TOKEN, allowed_hosts=["*.example.com", *allowed])["id"]
    mark = len(mcp_server.seen_headers)
    created = _add(admin, org, mcp_server.url, key, tok)
    server = _settle(admin, org, created["id"])
    assert server["status"] == "valid" and server["tool_count"] == 4, server
    tools = admin.get(f"orgs/{org}/mcp-servers/{created['id']}/tools").get_json()["items"]
    assert {t["name"] for t in tools} == {"add", "echo", "whoami", "slow"}
    seen = mcp_server.seen_headers[mark:]
    assert seen and all(h.get("x-api-key") == KEY and h.get("authorization") == f"token {TOKEN}" for h in seen)

    job = wait_job(admin.get, f"orgs/{org}/jobs/{created['job']['id']}")
    assert job["status"] == "succeeded" and job["result"] == {"status": "valid", "tool_count": 4}
    with db.session() as s:
        row = s.get(Job, created["job"]["id"])
        assert row is not None
        assert sorted(r["secret_id"] for r in row.resolved_secrets) == sorted([key, tok])
        assert row.params["headers"][0] == {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key}
        assert KEY not in str(row.params) and TOKEN not in str(row.params) and KEY not in str(row.result)


def test_a_wrong_header_value_is_auth_failed(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    key = factory.secret(admin, org, value="wrong-" + KEY)["id"]
    tok = factory.secret(admin, org, value=TOKEN)["id"]
    server = _settle(admin, org, _add(admin, org, mcp_server.url, key, tok)["id"])
    assert server["status"] == "invalid" and server["status_error"]["code"] == "auth_failed"


def test_a_header_secret_whose_allowed_hosts_exclude_the_server_sends_nothing(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    # One secret allows the server, the other does not: the destination must satisfy both.
    key = factory.secret(admin, org, value=KEY, allowed_hosts=[f"127.0.0.1:{mcp_server.port}"])["id"]
    tok = factory.secret(admin, org, value=TOKEN, allowed_hosts=["api.example.com"])["id"]
    mark = len(mcp_server.seen_headers)
    created = _add(admin, org, mcp_server.url, key, tok)
    server = _settle(admin, org, created["id"])
    assert server["status"] == "invalid" and server["status_error"]["code"] == "secret_destination_denied"
    assert KEY not in server["status_error"]["message"] and TOKEN not in server["status_error"]["message"]
    assert _carrying(mcp_server, mark, KEY, TOKEN) == []  # nothing was sent, with either value
    with db.session() as s:
        denial = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "egress.denied", AuditEvent.target_id == created["id"])
        ).one()
        assert denial.details["code"] == "secret_destination_denied" and denial.details["host"] == "127.0.0.1"


def test_a_secret_value_with_a_line_break_is_refused_before_sending(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    key = factory.secret(admin, org, value=KEY + "\r\nX-Injected: 1")["id"]
    tok = factory.secret(admin, org, value=TOKEN)["id"]
    mark = len(mcp_server.seen_headers)
    server = _settle(admin, org, _add(admin, org, mcp_server.url, key, tok)["id"])
    assert server["status_error"]["code"] == "invalid_header_value"
    assert KEY not in server["status_error"]["message"]
    assert mcp_server.seen_headers[mark:] == []


def test_an_agent_calls_a_tool_through_a_header_credentialed_server(
    worker: Celery, llm: LlmTestServer, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    provider_id, _ = provider(admin, org, factory, llm)
    key = factory.secret(admin, org, value=KEY)["id"]
    tok = factory.secret(admin, org, value=TOKEN)["id"]
    server = _settle(admin, org, _add(admin, org, mcp_server.url, key, tok)["id"])
    assert server["status"] == "valid", server
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server["id"], "tool_name": "echo"}])
    # The model tries to make the tool repeat the header secret: the run's masker knows it.
    llm.script([{"tool_calls": [{"name": "echo", "arguments": {"text": "hi"}}]}, {"text": f"done {KEY}"}])
    mark = len(mcp_server.seen_headers)
    resp = admin.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": "echo hi"})
    assert resp.status_code == 202, resp.get_json()
    run_id = resp.get_json()["run"]["id"]

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = admin.get(f"orgs/{org}/runs/{run_id}").get_json()
        return run if run["status"] in ("succeeded", "failed") else None

    run: dict[str, Any] = wait_for(finished, timeout=30)
    assert run["status"] == "succeeded", run
    assert [e["type"] for e in run["events"]] == ["status", "tool_call", "tool_result", "final"]
    assert run["events"][2]["content"] == "hi"
    assert KEY not in run["output"] and KEY not in str(run["events"])
    seen = mcp_server.seen_headers[mark:]
    assert seen and all(h.get("x-api-key") == KEY and h.get("authorization") == f"token {TOKEN}" for h in seen)
    for req in llm.requests:
        assert KEY not in req.raw and TOKEN not in req.raw and PROVIDER_KEY not in req.raw
