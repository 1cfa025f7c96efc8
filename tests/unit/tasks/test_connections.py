"""The OAuth connection jobs called directly (prepare, exchange, validate, refresh, revoke, runs), against a
real OAuth 2.1 authorization server and OAuth-protected MCP server (``tests/support/oauth_server.py``)."""

from __future__ import annotations

import gc
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2
import pytest
from celery import Celery
from sqlalchemy import select

from app.db import Database
from app.jobs.names import TaskName
from app.models import AgentRun, AuditEvent, ConnectionStatus, Job, JobStatus, McpConnection, McpServer, Secret
from tests.functional.web.test_web_plaintext import held_by_live_containers, reachable_from_modules
from tests.support.agents import agent, provider
from tests.support.factories import Caller, Factory
from tests.support.leaks import dump_database, dump_redis, find_leaks
from tests.support.llm_server import LlmTestServer
from tests.support.oauth_server import OAuthTestServer
from tests.support.workers import wait_for
from tests.unit.worker_support import run_task


@pytest.fixture
def auth() -> Iterator[OAuthTestServer]:
    with OAuthTestServer(auto_approve=True, access_token_ttl=60.0) as server:
        yield server


def _queued(db: Database, kind: TaskName) -> list[Job]:
    with db.session() as s:
        rows = list(s.scalars(select(Job).where(Job.kind == kind, Job.status == JobStatus.QUEUED).order_by(Job.id)))
        s.expunge_all()
        return rows


def _run_all(tasks_app: Celery, db: Database, kind: TaskName) -> list[str]:
    return [run_task(tasks_app, kind, job.id) for job in _queued(db, kind)]


def _add(caller: Caller, org: str, url: str, **auth: Any) -> str:
    body = {"name": "Protected", "url": url, "auth": {"type": "oauth", **auth}}
    resp = caller.post(f"orgs/{org}/mcp-servers", json=body)
    assert resp.status_code == 201, resp.get_json()
    server_id: str = resp.get_json()["id"]
    return server_id


def _prepare(
    tasks_app: Celery, db: Database, caller: Caller, org: str, server_id: str, outcome: str = "succeeded"
) -> tuple[Any, Job]:
    """POST .../connect, with the prepare job run here while the request waits: (response, job)."""
    answer: dict[str, Any] = {}
    request = threading.Thread(
        target=lambda: answer.update(resp=caller.post(f"orgs/{org}/mcp-servers/{server_id}/connect"))
    )
    request.start()
    job = wait_for(lambda: _queued(db, TaskName.PREPARE_CONNECTION), 10)[0]
    assert run_task(tasks_app, TaskName.PREPARE_CONNECTION, job.id) == outcome
    request.join(20)
    return answer["resp"], job


def _connect(
    tasks_app: Celery,
    db: Database,
    caller: Caller,
    org: str,
    server_id: str,
    *,
    before_exchange: Callable[[str, str], None] | None = None,
    exchange: str = "succeeded",
) -> None:
    """Connect as ``caller``: the prepare job run here while the request waits, approval, the exchange.

    ``before_exchange(state, code)`` runs while the exchange's message still waits in the broker."""
    resp, _job = _prepare(tasks_app, db, caller, org, server_id)
    assert resp.status_code == 200, resp.get_json()
    approved = _browser_get(resp.get_json()["authorization_url"])
    # Not urllib's urlsplit: it caches what it split (the code would stay in this process).
    params = httpx2.URL(approved.headers["location"]).params
    query = {key: [params[key]] for key in ("state", "code")}
    done = caller.post("oauth/callback", json={"state": query["state"][0], "code": query["code"][0]})
    assert done.status_code == 202, done.get_json()
    if before_exchange is not None:
        before_exchange(query["state"][0], query["code"][0])
    assert run_task(tasks_app, TaskName.EXCHANGE_CODE, done.get_json()["job"]["id"]) == exchange


def _browser_get(url: str) -> httpx2.Response:
    """What the user's browser does at the authorization server. Its HTTP client's debug log (which
    records the redirect, code and all) is the browser's, not Latchkey's: kept out of the scans."""
    logging.disable(logging.INFO)  # nothing else runs meanwhile: the worker jobs run in this thread
    try:
        return httpx2.get(url, follow_redirects=False)
    finally:
        logging.disable(logging.NOTSET)


def _validate(tasks_app: Celery, db: Database, caller: Caller, org: str, server_id: str) -> dict[str, Any]:
    resp = caller.post(f"orgs/{org}/mcp-servers/{server_id}/validate")
    assert resp.status_code == 202
    job_id = resp.get_json()["job"]["id"]
    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, job_id) == "succeeded"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.result is not None
        return {"result": job.result, "resolved": job.resolved_secrets}


def _connection(db: Database, server_id: str, subject: str = "org") -> McpConnection | None:
    with db.session() as s:
        row = s.scalar(
            select(McpConnection).where(McpConnection.mcp_server_id == server_id, McpConnection.subject == subject)
        )
        if row is not None:
            s.expunge(row)
        return row


def _actions(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def test_connect_then_the_validation_lists_tools_with_the_connection(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer
) -> None:
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url)
    _connect(tasks_app, db, admin, org, server_id)
    # The exchange queued the validation that lists the tools with the new token.
    outcomes = _run_all(tasks_app, db, TaskName.VALIDATE_SERVER)
    assert outcomes and set(outcomes) == {"succeeded"}
    connection = _connection(db, server_id)
    assert connection is not None and connection.status == ConnectionStatus.CONNECTED
    with db.session() as s:
        server = s.get(McpServer, server_id)
        assert server is not None and server.status == "valid" and server.tool_count >= 3
    validated = _validate(tasks_app, db, admin, org, server_id)
    assert validated["resolved"] == [{"secret_id": connection.secret_id, "version": 1}]
    assert {"mcp_connection.authorization_started", "mcp_connection.callback", "mcp_connection.connected"} <= set(
        _actions(db)
    )
    assert auth.bearer_seen


def test_an_expired_token_is_refreshed_once_and_the_new_version_used(
    tasks_app: Celery, db: Database, factory: Factory, org: str
) -> None:
    with OAuthTestServer(auto_approve=True, access_token_ttl=4.0) as auth:
        admin = factory.user(org, "admin")
        server_id = _add(admin, org, auth.url)
        _connect(tasks_app, db, admin, org, server_id)
        time.sleep(4.1)
        first = _validate(tasks_app, db, admin, org, server_id)
        assert first["result"]["status"] == "valid", first
        assert auth.refresh_redemptions == 1
        connection = _connection(db, server_id)
        assert connection is not None and first["resolved"] == [{"secret_id": connection.secret_id, "version": 2}]
        # The fresh token is used as it is: no second redemption.
        assert _validate(tasks_app, db, admin, org, server_id)["result"]["status"] == "valid"
        assert auth.refresh_redemptions == 1
        assert "mcp_connection.refresh" in _actions(db)


def test_a_refused_refresh_ends_auth_required_and_drops_the_tokens(
    tasks_app: Celery, db: Database, factory: Factory, org: str
) -> None:
    with OAuthTestServer(auto_approve=True, access_token_ttl=1.0) as auth:
        admin = factory.user(org, "admin")
        server_id = _add(admin, org, auth.url)
        _connect(tasks_app, db, admin, org, server_id)
        secret_id = (_connection(db, server_id) or pytest.fail("no connection")).secret_id
        auth.revoke_refresh_tokens()
        time.sleep(1.1)
        outcome = _validate(tasks_app, db, admin, org, server_id)
        assert outcome["result"]["error"]["code"] == "auth_required"
        assert "Protected" in outcome["result"]["error"]["message"]
        connection = _connection(db, server_id)
        assert connection is not None and connection.status == ConnectionStatus.AUTH_REQUIRED
        assert connection.secret_id is None and connection.error_code == "invalid_grant"
        with db.session() as s:
            assert s.get(Secret, secret_id) is None
        assert "mcp_connection.refresh_failed" in _actions(db)


def test_disconnect_revokes_the_grant_and_deletes_the_tokens(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer
) -> None:
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url)
    _connect(tasks_app, db, admin, org, server_id)
    assert admin.delete(f"orgs/{org}/mcp-servers/{server_id}/connection").status_code == 204
    # A second disconnect finds nothing to disconnect.
    assert admin.delete(f"orgs/{org}/mcp-servers/{server_id}/connection").status_code == 404
    # Unusable before the worker even ran: a validation now needs a connection.
    assert _validate(tasks_app, db, admin, org, server_id)["result"]["error"]["code"] == "auth_required"
    assert _run_all(tasks_app, db, TaskName.REVOKE_CONNECTION) == ["succeeded"]
    assert _connection(db, server_id) is None
    # The refresh token first (revoking it revokes its grant's access tokens at this server too).
    assert auth.revoked == ["refresh"]
    with db.session() as s:
        assert s.scalars(select(Secret).where(Secret.kind == "connection")).all() == []


def test_a_run_uses_the_connection_of_the_user_who_started_it_and_no_one_elses(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    alice, bob = factory.user(org, "member"), factory.user(org, "member")
    server_id = _add(admin, org, auth.url, scope="user")
    auth.next_user = "alice"
    _connect(tasks_app, db, alice, org, server_id)
    _run_all(tasks_app, db, TaskName.VALIDATE_SERVER)
    provider_id, _ = provider(admin, org, factory, llm)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "whoami"}])

    def run_as(caller: Caller) -> AgentRun:
        resp = caller.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": "who am I?"})
        assert resp.status_code == 202, resp.get_json()
        run_task(tasks_app, TaskName.RUN_AGENT, resp.get_json()["job"]["id"])
        with db.session() as s:
            run = s.get(AgentRun, resp.get_json()["run"]["id"])
            assert run is not None
            s.expunge(run)
            return run

    llm.script([{"tool_calls": [{"name": "whoami", "arguments": {}}]}, {"text": "done"}])
    mine = run_as(alice)
    assert mine.status == JobStatus.SUCCEEDED, (mine.error_code, mine.error_message)
    results = [e for e in mine.events if e["type"] == "tool_result"]
    assert results and results[0]["content"] == "alice"
    # Bob never connected: his run ends auth_required naming the server, before the model is asked.
    llm.reset()
    theirs = run_as(bob)
    assert theirs.status == JobStatus.FAILED and theirs.error_code == "auth_required"
    assert "Protected" in (theirs.error_message or "")
    assert len(llm.requests) == 0


def test_insufficient_scope_asks_for_the_union_on_the_next_connect(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer, llm: LlmTestServer
) -> None:
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url, scopes=["tools:read", "tools:call"])
    _connect(tasks_app, db, admin, org, server_id)
    _run_all(tasks_app, db, TaskName.VALIDATE_SERVER)
    provider_id, _ = provider(admin, org, factory, llm)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "admin_tool"}])
    llm.script([{"tool_calls": [{"name": "admin_tool", "arguments": {}}]}, {"text": "could not"}])
    resp = admin.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": "do admin things"})
    run_task(tasks_app, TaskName.RUN_AGENT, resp.get_json()["job"]["id"])
    with db.session() as s:
        run = s.get(AgentRun, resp.get_json()["run"]["id"])
        assert run is not None
        errors = [e for e in run.events if e["type"] == "tool_error"]
        assert errors and errors[0]["code"] == "insufficient_scope"
    connection = _connection(db, server_id)
    assert connection is not None and "admin" in connection.wanted_scopes
    # The next authorization asks for the granted scopes and the missing one.
    _connect(tasks_app, db, admin, org, server_id)
    assert set(auth.authorize_requests[-1]["scope"].split()) >= {"tools:read", "tools:call", "admin"}
    connection = _connection(db, server_id)
    assert connection is not None and connection.wanted_scopes == [] and "admin" in connection.scopes


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_client_credentials_fetch_a_token_once_and_cache_it_until_it_expires(
    tasks_app: Celery, db: Database, factory: Factory, org: str, method: str
) -> None:
    with OAuthTestServer(preregistered={"machine": "machine-secret-" + "m" * 20}, access_token_ttl=4.0) as auth:
        admin = factory.user(org, "admin")
        secret = factory.secret(admin, org, value="machine-secret-" + "m" * 20)["id"]
        body = {
            "type": "oauth_client_credentials",
            "client_id": "machine",
            "client_secret_ref": secret,
            "token_endpoint_auth_method": method,
        }
        resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": "Machine", "url": auth.url, "auth": body})
        assert resp.status_code == 201, resp.get_json()
        server_id = resp.get_json()["id"]
        assert _run_all(tasks_app, db, TaskName.VALIDATE_SERVER) == ["succeeded"]
        grants = [r for r in auth.token_requests if r["grant_type"] == "client_credentials"]
        assert len(grants) == 1 and grants[0]["resource"] == auth.url
        with db.session() as s:
            server = s.get(McpServer, server_id)
            assert server is not None and server.status == "valid"
        # Cached: a second use asks for nothing.
        assert _validate(tasks_app, db, admin, org, server_id)["result"]["status"] == "valid"
        assert len([r for r in auth.token_requests if r["grant_type"] == "client_credentials"]) == 1
        # Expired: a new token, once.
        time.sleep(4.1)
        assert _validate(tasks_app, db, admin, org, server_id)["result"]["status"] == "valid"
        assert len([r for r in auth.token_requests if r["grant_type"] == "client_credentials"]) == 2
        secret_value = "machine-secret-" + "m" * 20
        assert secret_value in auth.issued_values()


def test_client_credentials_with_a_private_key_jwt(tasks_app: Celery, db: Database, factory: Factory, org: str) -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: TID251 - test key material
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: TID251

    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with OAuthTestServer(preregistered={"signer": public_pem}) as auth:
        admin = factory.user(org, "admin")
        secret = factory.secret(admin, org, value=private_pem)["id"]
        body = {
            "type": "oauth_client_credentials",
            "client_id": "signer",
            "client_secret_ref": secret,
            "token_endpoint_auth_method": "private_key_jwt",
        }
        resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": "Signed", "url": auth.url, "auth": body})
        assert resp.status_code == 201, resp.get_json()
        assert _run_all(tasks_app, db, TaskName.VALIDATE_SERVER) == ["succeeded"]
        with db.session() as s:
            server = s.get(McpServer, resp.get_json()["id"])
            assert server is not None and server.status == "valid", server.status_error_message


def test_no_token_code_or_verifier_reaches_the_database_redis_the_broker_job_results_or_logs(
    tasks_app: Celery,
    db: Database,
    factory: Factory,
    org: str,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with OAuthTestServer(auto_approve=True, access_token_ttl=1.0) as auth:
        admin = factory.user(org, "admin")
        server_id = _add(admin, org, auth.url)

        def while_queued(state: str, code: str) -> None:
            # The exchange's message is in the broker now (nobody consumes this queue): ids only.
            assert not find_leaks(dump_redis(redis_url), [state, code])
            assert not find_leaks(dump_database(db.engine), [state, code])

        _connect(tasks_app, db, admin, org, server_id, before_exchange=while_queued)
        _run_all(tasks_app, db, TaskName.VALIDATE_SERVER)
        time.sleep(1.1)  # and a refresh, so a rotated refresh token is among the canaries
        assert _validate(tasks_app, db, admin, org, server_id)["result"]["status"] == "valid"
        assert auth.refresh_redemptions >= 1  # (one more if this machine is slow enough for a token to age)
        canaries = auth.issued_values()
    assert len(canaries) >= 5  # code, verifier, two access tokens, two refresh tokens at least
    haystacks = [*dump_database(db.engine), *dump_redis(redis_url), ("logs", caplog.text)]
    assert not find_leaks(haystacks, canaries)


@pytest.fixture
def auth_process() -> Iterator[str]:
    """The OAuth test server in a process of its own (so this process holds only what Latchkey keeps)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.oauth_server", "--port", str(port), "--auto-approve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    try:

        def up() -> bool:
            try:
                return httpx2.get(f"http://127.0.0.1:{port}/.well-known/oauth-authorization-server").status_code == 200
            except httpx2.HTTPError:
                return False

        wait_for(up, 20)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_after_the_callback_this_process_holds_no_authorization_code(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth_process: str
) -> None:
    """Web tier and worker alike (both run here): once the exchange is done, the code is nowhere."""
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth_process)
    seen: list[str] = []
    _connect(tasks_app, db, admin, org, server_id, before_exchange=lambda _state, code: seen.append(code))
    assert _connection(db, server_id) is not None
    needles = (seen.pop(),)
    gc.collect()  # also untracks the needles' own tuple (it holds only a string)
    assert reachable_from_modules(needles) == []
    assert held_by_live_containers(needles) == []


def test_a_code_without_the_verifier_is_useless(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer
) -> None:
    """Whoever reads the callback URL (a log, a proxy, a browser history) holds a code and no verifier."""
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url)
    answers: list[httpx2.Response] = []

    def steal(_state: str, code: str) -> None:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": admin_redirect(tasks_app),
            "client_id": auth.authorize_requests[-1]["client_id"],  # public: it is in the authorization URL
            "resource": auth.url,
        }
        answers.append(httpx2.post(auth.token_endpoint, data=form))
        answers.append(httpx2.post(auth.token_endpoint, data={**form, "code_verifier": "x" * 64}))

    _connect(tasks_app, db, admin, org, server_id, before_exchange=steal)
    assert [a.status_code for a in answers] == [400, 400]
    assert all("access_token" not in a.text for a in answers)
    # The worker, which holds the verifier, still redeems it.
    connection = _connection(db, server_id)
    assert connection is not None and connection.status == ConnectionStatus.CONNECTED


def admin_redirect(tasks_app: Celery) -> str:
    settings = tasks_app.conf["latchkey_settings"]
    redirect: str = settings.oauth_redirect_uri
    return redirect


class _Metadata(BaseHTTPRequestHandler):
    """An MCP server whose authorization metadata points its endpoints at the cloud metadata address."""

    def do_POST(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.send_response(401)
        self.send_header(
            "WWW-Authenticate", f'Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"'
        )
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        evil = "http://169.254.169.254"
        docs = {
            "/.well-known/oauth-protected-resource/mcp": {"resource": f"{base}/mcp", "authorization_servers": [base]},
            "/.well-known/oauth-authorization-server": {
                "issuer": base,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{evil}/token",
                "registration_endpoint": f"{evil}/register",
                "code_challenge_methods_supported": ["S256"],
            },
        }
        doc = docs.get(self.path)
        body = json.dumps(doc).encode() if doc else b""
        self.send_response(200 if doc else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_registration_on_a_metadata_address_is_refused_by_the_guard(
    tasks_app: Celery, db: Database, factory: Factory, org: str
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin = factory.user(org, "admin")
        server_id = _add(admin, org, f"http://127.0.0.1:{server.server_address[1]}/mcp")
        resp, job = _prepare(tasks_app, db, admin, org, server_id, outcome="failed")
        assert resp.status_code == 502 and resp.get_json()["reason"] == "egress_denied"
        with db.session() as s:
            failed = s.get(Job, job.id)
            assert failed is not None and failed.error_code == "egress_denied"
        assert "mcp_connection.authorization_failed" in _actions(db)
    finally:
        server.shutdown()


def test_never_passthrough_no_latchkey_credential_reaches_the_server(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer
) -> None:
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url)
    _connect(tasks_app, db, admin, org, server_id)
    _run_all(tasks_app, db, TaskName.VALIDATE_SERVER)
    assert auth.bearer_seen
    assert admin.token not in auth.bearer_seen and all(admin.token not in v for v in auth.issued_values())


def test_an_exchange_for_a_server_repointed_since_the_authorization_began_sends_nothing(
    tasks_app: Celery, db: Database, factory: Factory, org: str, auth: OAuthTestServer
) -> None:
    """The code and verifier go nowhere once the server was pointed elsewhere after Connect."""
    admin = factory.user(org, "admin")
    server_id = _add(admin, org, auth.url)

    def repoint(_state: str, _code: str) -> None:
        resp = admin.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"url": auth.url + "?moved=1"})
        assert resp.status_code == 200, resp.get_json()

    _connect(tasks_app, db, admin, org, server_id, before_exchange=repoint, exchange="failed")
    assert [r for r in auth.token_requests if r["grant_type"] == "authorization_code"] == []
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == TaskName.EXCHANGE_CODE)).one()
        assert job.error_code == "stale"
    assert _connection(db, server_id) is None
