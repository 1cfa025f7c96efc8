"""OAuth MCP connections end to end: API -> real workers -> a real OAuth 2.1 authorization server and
an OAuth-protected MCP server (the SDK's server auth), with PKCE, rotating refresh tokens and revocation."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from celery import Celery
from sqlalchemy import select

from app.config import Settings
from app.models import McpConnection, OAuthFlow, Secret
from tests.support.agents import agent, provider
from tests.support.factories import Caller, Factory
from tests.support.leaks import dump_database, dump_redis, find_leaks
from tests.support.llm_server import LlmTestServer
from tests.support.oauth_server import OAuthTestServer
from tests.support.processes import worker_process
from tests.support.workers import wait_for, wait_job


@pytest.fixture
def oauth_server() -> Iterator[OAuthTestServer]:
    with OAuthTestServer(auto_approve=True, access_token_ttl=60.0) as server:
        yield server


def _add(caller: Caller, org: str, url: str, scope: str = "org") -> dict[str, Any]:
    resp = caller.post(
        f"orgs/{org}/mcp-servers", json={"name": "Protected", "url": url, "auth": {"type": "oauth", "scope": scope}}
    )
    assert resp.status_code == 201, resp.get_json()
    body: dict[str, Any] = resp.get_json()
    return body


def _approve(caller: Caller, org: str, server_id: str) -> tuple[str, str]:
    """Connect: the worker's authorization URL, approved (auto) at the server: (state, code)."""
    resp = caller.post(f"orgs/{org}/mcp-servers/{server_id}/connect")
    assert resp.status_code == 200, resp.get_json()
    url = resp.get_json()["authorization_url"]
    answer = httpx2.get(url, follow_redirects=False)
    assert answer.status_code in (302, 303), answer.text
    location = answer.headers["location"]
    assert location.startswith(caller.client.application.config["LATCHKEY_SETTINGS"].oauth_redirect_uri + "?")
    query = parse_qs(urlsplit(location).query)
    return query["state"][0], query["code"][0]


def _connect(caller: Caller, org: str, server_id: str) -> dict[str, Any]:
    state, code = _approve(caller, org, server_id)
    resp = caller.post("oauth/callback", json={"state": state, "code": code})
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(caller.get, f"orgs/{org}/jobs/{resp.get_json()['job']['id']}")
    assert job["status"] == "succeeded", job
    return job


def _settled(caller: Caller, org: str, server_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = caller.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()
        return body if body["status"] in ("valid", "invalid") else None

    result: dict[str, Any] = wait_for(done, 20)
    return result


def test_connect_approve_exchange_then_tools_are_listed_with_the_token(
    worker: Celery, oauth_server: OAuthTestServer, admin: Caller, org: str, db: Any, redis_url: str
) -> None:
    server = _add(admin, org, oauth_server.url)
    # Before any connection the validation cannot authenticate: auth_required, nothing sent with a token.
    first = _settled(admin, org, server["id"])
    assert first["status"] == "invalid" and first["status_error"]["code"] == "auth_required"
    assert first["auth"]["type"] == "oauth" and first["connection"]["status"] == "auth_required"

    job = _connect(admin, org, server["id"])
    assert job["result"]["status"] == "connected"
    # Discovery found the server, the client was registered dynamically, PKCE S256 and the resource were sent.
    assert len(oauth_server.registrations) == 1
    authorize = oauth_server.authorize_requests[-1]
    assert authorize["code_challenge_method"] == "S256" and authorize["resource"] == oauth_server.url
    assert oauth_server.token_requests[-1]["grant_type"] == "authorization_code"
    assert oauth_server.token_requests[-1]["resource"] == oauth_server.url

    valid = _settled(admin, org, server["id"])
    assert valid["status"] == "valid", valid
    tools = {t["name"] for t in admin.get(f"orgs/{org}/mcp-servers/{server['id']}/tools").get_json()["items"]}
    assert {"whoami", "echo", "admin_tool"} <= tools
    connection = admin.get(f"orgs/{org}/mcp-servers/{server['id']}/connection").get_json()
    assert connection["status"] == "connected" and connection["scope"] == "org"
    assert connection["expires_at"] is not None
    assert oauth_server.bearer_seen  # the MCP server was called with the issued access token

    with db.session() as s:
        row = s.scalar(select(McpConnection).where(McpConnection.mcp_server_id == server["id"]))
        assert row is not None and row.secret_id is not None
        secret = s.get(Secret, row.secret_id)
        assert secret is not None and secret.kind == "connection"
        flow = s.scalar(select(OAuthFlow).where(OAuthFlow.mcp_server_id == server["id"]))
        assert flow is not None and flow.sealed is None and flow.code_sealed is None
    # The connection's secret is nobody's to see: not listed, not readable, not revealable.
    assert all(item["id"] != row.secret_id for item in admin.get(f"orgs/{org}/secrets").get_json()["items"])
    assert admin.get(f"orgs/{org}/secrets/{row.secret_id}").status_code == 404
    assert admin.post(f"orgs/{org}/secrets/{row.secret_id}/reveal").status_code == 404

    # Canary scan: no access token, refresh token, code or verifier anywhere in plaintext.
    canaries = oauth_server.issued_values()
    assert canaries
    assert not find_leaks(dump_database(db.engine), canaries)
    assert not find_leaks(dump_redis(redis_url), canaries)


def test_state_is_single_use_and_bound_to_the_user_who_began_it(
    worker: Celery, oauth_server: OAuthTestServer, factory: Factory, org: str
) -> None:
    alice, bob = factory.user(org, "member"), factory.user(org, "member")
    server = _add(alice, org, oauth_server.url, scope="user")
    state, code = _approve(alice, org, server["id"])
    # Another member cannot complete Alice's authorization, and trying does not use it up.
    other = bob.post("oauth/callback", json={"state": state, "code": code})
    assert other.status_code == 404 and other.get_json()["code"] == "invalid_state"
    unknown = alice.post("oauth/callback", json={"state": "not-a-state", "code": code})
    assert unknown.status_code == 404 and unknown.get_json()["code"] == "invalid_state"
    done = alice.post("oauth/callback", json={"state": state, "code": code})
    assert done.status_code == 202
    again = alice.post("oauth/callback", json={"state": state, "code": code})
    assert again.status_code == 404 and again.get_json()["code"] == "invalid_state"
    wait_job(alice.get, f"orgs/{org}/jobs/{done.get_json()['job']['id']}")
    # Per-user: Alice is connected, Bob is not.
    assert alice.get(f"orgs/{org}/mcp-servers/{server['id']}/connection").get_json()["status"] == "connected"
    assert bob.get(f"orgs/{org}/mcp-servers/{server['id']}/connection").get_json()["status"] == "auth_required"


def test_an_expired_state_is_refused(
    worker: Celery, oauth_server: OAuthTestServer, admin: Caller, org: str, db: Any
) -> None:
    from datetime import timedelta

    from app.db import utcnow

    server = _add(admin, org, oauth_server.url)
    state, code = _approve(admin, org, server["id"])
    with db.session() as s:
        flow = s.scalar(select(OAuthFlow).where(OAuthFlow.mcp_server_id == server["id"]))
        assert flow is not None
        flow.expires_at = utcnow() - timedelta(seconds=1)
    resp = admin.post("oauth/callback", json={"state": state, "code": code})
    assert resp.status_code == 404 and resp.get_json()["code"] == "invalid_state"
    assert oauth_server.token_requests == []  # nothing was redeemed


def test_concurrent_uses_at_expiry_redeem_the_refresh_token_exactly_once(
    worker: Celery, settings: Settings, admin: Caller, org: str
) -> None:
    with (
        OAuthTestServer(auto_approve=True, access_token_ttl=4.0, token_endpoint_delay=0.3) as auth,
        worker_process(settings, Path(tempfile.gettempdir()) / f"{settings.queue}-second.log"),
    ):
        server = _add(admin, org, auth.url)
        _connect(admin, org, server["id"])
        _settled(admin, org, server["id"])
        time.sleep(4.2)  # the access token has expired (and the new one lives long enough for all 8)
        jobs: list[str] = []
        lock = threading.Lock()

        def validate() -> None:
            resp = admin.post(f"orgs/{org}/mcp-servers/{server['id']}/validate")
            assert resp.status_code == 202
            with lock:
                jobs.append(resp.get_json()["job"]["id"])

        threads = [threading.Thread(target=validate) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [wait_job(admin.get, f"orgs/{org}/jobs/{job_id}", timeout=60) for job_id in jobs]
        assert all(r["status"] == "succeeded" and r["result"]["status"] == "valid" for r in results), results
        assert auth.refresh_redemptions == 1
        assert auth.refresh_attempts == 1


def test_a_revoked_refresh_token_ends_auth_required_and_drops_the_tokens(
    worker: Celery, admin: Caller, org: str, db: Any
) -> None:
    with OAuthTestServer(auto_approve=True, access_token_ttl=1.0) as auth:
        server = _add(admin, org, auth.url)
        _connect(admin, org, server["id"])
        _settled(admin, org, server["id"])
        auth.revoke_refresh_tokens()
        time.sleep(1.2)
        resp = admin.post(f"orgs/{org}/mcp-servers/{server['id']}/validate")
        job = wait_job(admin.get, f"orgs/{org}/jobs/{resp.get_json()['job']['id']}")
        assert job["result"]["status"] == "invalid" and job["result"]["error"]["code"] == "auth_required"
        connection = admin.get(f"orgs/{org}/mcp-servers/{server['id']}/connection").get_json()
        assert connection["status"] == "auth_required"
        with db.session() as s:
            row = s.scalar(select(McpConnection).where(McpConnection.mcp_server_id == server["id"]))
            assert row is not None and row.secret_id is None and row.error_code == "invalid_grant"
            assert s.scalars(select(Secret).where(Secret.kind == "connection", Secret.org_id == row.org_id)).all() == []


def test_disconnect_revokes_at_the_server_and_deletes_the_tokens(
    worker: Celery, oauth_server: OAuthTestServer, admin: Caller, org: str, db: Any
) -> None:
    server = _add(admin, org, oauth_server.url)
    _connect(admin, org, server["id"])
    resp = admin.delete(f"orgs/{org}/mcp-servers/{server['id']}/connection")
    assert resp.status_code == 204
    # Unusable at once, revoked and deleted by a worker.
    assert admin.get(f"orgs/{org}/mcp-servers/{server['id']}/connection").get_json()["status"] == "auth_required"

    def gone() -> bool:
        with db.session() as s:
            return s.scalar(select(McpConnection).where(McpConnection.mcp_server_id == server["id"])) is None

    wait_for(gone, 20)
    assert wait_for(lambda: len(oauth_server.revoked) >= 1, 10)
    with db.session() as s:
        assert s.scalars(select(Secret).where(Secret.kind == "connection")).all() == []


def test_discovery_on_a_metadata_address_is_refused_by_the_guard(worker: Celery, admin: Caller, org: str) -> None:
    server = _add(admin, org, "http://169.254.169.254/mcp")
    resp = admin.post(f"orgs/{org}/mcp-servers/{server['id']}/connect")
    assert resp.status_code == 502, resp.get_json()
    assert resp.get_json()["code"] == "connect_failed" and resp.get_json()["reason"] == "egress_denied"


def test_an_agent_run_calls_a_tool_with_the_starting_users_connection(
    worker: Celery, oauth_server: OAuthTestServer, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    alice, bob = factory.user(org, "member"), factory.user(org, "member")
    server = _add(alice, org, oauth_server.url, scope="user")
    oauth_server.next_user = "alice"
    _connect(alice, org, server["id"])
    wait_for(lambda: alice.get(f"orgs/{org}/mcp-servers/{server['id']}").get_json()["status"] == "valid", 20)
    provider_id, _ = provider(admin, org, factory, llm)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server["id"], "tool_name": "whoami"}])

    def run(caller: Caller) -> dict[str, Any]:
        resp = caller.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": "who am I?"})
        assert resp.status_code == 202, resp.get_json()
        run_id = resp.get_json()["run"]["id"]

        def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = caller.get(f"orgs/{org}/runs/{run_id}").get_json()
            return body if body["status"] in ("succeeded", "failed") else None

        result: dict[str, Any] = wait_for(finished, 30)
        return result

    llm.script([{"tool_calls": [{"name": "whoami", "arguments": {}}]}, {"text": "done"}])
    mine = run(alice)
    assert mine["status"] == "succeeded", mine
    assert [e["content"] for e in mine["events"] if e["type"] == "tool_result"] == ["alice"]
    theirs = run(bob)
    assert theirs["status"] == "failed" and theirs["error"]["code"] == "auth_required"
    assert "Protected" in theirs["error"]["message"]
