"""MCP servers end to end: API -> real broker -> real worker -> a real MCP server over HTTP."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from app.config import Settings
from app.models import AuditEvent, Job, McpServer
from tests.support.factories import Caller, Factory
from tests.support.leaks import dump_broker_queue, dump_database, dump_redis, find_leaks
from tests.support.legacy_data import MCP
from tests.support.mcp_server import McpTestServer
from tests.support.workers import extra_worker, parked_app, wait_for, wait_job

TOKEN = "mcp-bearer-" + "t" * 24


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(token=TOKEN) as server:
        yield server


def _settle(caller: Caller, org: str, server_id: str, timeout: float = 20) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = caller.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()
        return body if body["status"] in ("valid", "invalid") else None

    result: dict[str, Any] = wait_for(done, timeout)
    return result


def _add(caller: Caller, org: str, url: str, secret_ref: str | None, **extra: Any) -> dict[str, Any]:
    body = {"name": "Files", "url": url, **({"secret_ref": secret_ref} if secret_ref else {}), **extra}
    resp = caller.post(f"orgs/{org}/mcp-servers", json=body)
    assert resp.status_code == 201, resp.get_json()
    created: dict[str, Any] = resp.get_json()
    return created


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_right_token_makes_the_server_valid_and_stores_its_tools(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, name="MCP_TOKEN", value=TOKEN)
    created = _add(admin, org, mcp_server.url, secret["id"])
    assert created["status"] == "pending" and created["job"]["kind"] == "mcp.validate_server"
    server = _settle(admin, org, created["id"])
    assert server["status"] == "valid" and server["status_error"] is None
    assert server["tool_count"] == 4
    tools = admin.get(f"orgs/{org}/mcp-servers/{created['id']}/tools").get_json()["items"]
    assert {t["name"] for t in tools} == {"add", "echo", "whoami", "slow"}
    add = next(t for t in tools if t["name"] == "add")
    assert add["input_schema"]["properties"].keys() >= {"a", "b"}
    assert mcp_server.seen_tokens[-1] == TOKEN

    job = wait_job(admin.get, f"orgs/{org}/jobs/{created['job']['id']}")
    assert job["status"] == "succeeded" and job["result"] == {"status": "valid", "tool_count": 4}
    with db.session() as s:
        row = s.get(Job, created["job"]["id"])
        assert row is not None and row.resolved_secrets == [{"secret_id": secret["id"], "version": 1}]
        audit = s.scalars(select(AuditEvent).where(AuditEvent.action == "mcp_server.validate")).all()
        assert audit[-1].details["secrets"] == [{"secret_id": secret["id"], "version": 1}]
    # The secret lists the server among its users.
    used_by = admin.get(f"orgs/{org}/secrets/{secret['id']}").get_json()["used_by"]
    assert used_by == [{"type": "mcp_server", "id": created["id"], "name": "Files"}]


def test_wrong_token_is_invalid_auth_failed(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, value="not-the-right-token-at-all")
    server = _settle(admin, org, _add(admin, org, mcp_server.url, secret["id"])["id"])
    assert server["status"] == "invalid"
    assert server["status_error"]["code"] == "auth_failed"
    assert "not-the-right" not in server["status_error"]["message"]


def test_server_down_is_unreachable(worker: Celery, admin: Caller, org: str, factory: Factory) -> None:
    secret = factory.secret(admin, org)
    server = _settle(admin, org, _add(admin, org, f"http://127.0.0.1:{_closed_port()}/mcp", secret["id"])["id"])
    assert (server["status"], server["status_error"]["code"]) == ("invalid", "unreachable")


def test_slow_server_times_out_within_the_configured_bound(
    worker: Celery, admin: Caller, org: str, factory: Factory, settings: Settings
) -> None:
    with McpTestServer(token=TOKEN, delay_seconds=settings.mcp_timeout_seconds + 3) as slow:
        secret = factory.secret(admin, org, value=TOKEN)
        created = _add(admin, org, slow.url, secret["id"])
        server = _settle(admin, org, created["id"], timeout=settings.mcp_timeout_seconds + 15)
    assert (server["status"], server["status_error"]["code"]) == ("invalid", "timeout")
    job = admin.get(f"orgs/{org}/jobs/{created['job']['id']}").get_json()
    from datetime import datetime

    took = datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
    assert took.total_seconds() < settings.mcp_timeout_seconds + 2


def test_an_edited_secret_is_sent_at_the_next_validation_and_the_old_one_never_again(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    old, new = "old-mcp-token-" + "o" * 16, "new-mcp-token-" + "n" * 16
    mcp_server.set_token(old)
    secret = factory.secret(admin, org, value=old)
    server_id = _add(admin, org, mcp_server.url, secret["id"])["id"]
    assert _settle(admin, org, server_id)["status"] == "valid"

    assert admin.patch(f"orgs/{org}/secrets/{secret['id']}", json={"value": new}).status_code == 200
    mcp_server.set_token(new)
    mark = len(mcp_server.seen_tokens)
    for _ in range(3):
        job = admin.post(f"orgs/{org}/mcp-servers/{server_id}/validate").get_json()["job"]
        assert wait_job(admin.get, f"orgs/{org}/jobs/{job['id']}")["result"]["status"] == "valid"
    sent_after_edit = mcp_server.seen_tokens[mark:]
    assert sent_after_edit and set(sent_after_edit) == {new}


def test_a_validation_queued_before_its_secret_was_unbound_and_deleted_ends_stale(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, settings: Settings
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, value=TOKEN)
    server_id = _add(admin, org, mcp_server.url, secret["id"])["id"]
    assert _settle(admin, org, server_id)["status"] == "valid"
    # The validation is requested while the secret is bound, but runs only after the secret
    # was unbound and deleted: its queue has no consumer until then.
    with parked_app(settings) as (web, queue):
        parked = Caller(web.test_client(), admin.token, admin.user_id, admin.email)
        job = parked.post(f"orgs/{org}/mcp-servers/{server_id}/validate").get_json()["job"]
        assert admin.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"secret_ref": None}).status_code == 200
        assert admin.delete(f"orgs/{org}/secrets/{secret['id']}").status_code == 204
        with extra_worker(settings, queue=queue):
            done = wait_job(admin.get, f"orgs/{org}/jobs/{job['id']}")
    # The binding changed after the job was queued: it ends before resolving anything.
    assert (done["status"], done["error"]["code"]) == ("failed", "stale")


def test_binding_rules(worker: Celery, admin: Caller, member: Caller, org: str, factory: Factory, db: Any) -> None:
    secret = factory.secret(admin, org)
    other_org = factory.org("other-mcp")
    foreign = factory.secret(factory.user(other_org, "admin"), other_org)
    resp = admin.post(
        f"orgs/{org}/mcp-servers", json={"name": "X", "url": "https://x.test/mcp", "secret_ref": foreign["id"]}
    )
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "secret_ref"
    resp = member.post(
        f"orgs/{org}/mcp-servers", json={"name": "X", "url": "https://x.test/mcp", "secret_ref": secret["id"]}
    )
    assert resp.status_code == 403
    resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": "X", "url": "https://x.test/mcp", "token": "raw"})
    assert resp.status_code == 422
    assert "secret_ref" in resp.get_json()["errors"][0]["message"]
    # A member may add a server without a secret, but not bind one to it or move a bound one.
    plain = member.post(f"orgs/{org}/mcp-servers", json={"name": "Open", "url": "https://open.test/mcp"})
    assert plain.status_code == 201
    assert (
        member.patch(f"orgs/{org}/mcp-servers/{plain.get_json()['id']}", json={"secret_ref": secret["id"]}).status_code
        == 403
    )
    bound = admin.post(
        f"orgs/{org}/mcp-servers", json={"name": "Bound", "url": "https://bound.test/mcp", "secret_ref": secret["id"]}
    ).get_json()
    assert (
        member.patch(f"orgs/{org}/mcp-servers/{bound['id']}", json={"url": "https://evil.test/mcp"}).status_code == 403
    )
    assert member.patch(f"orgs/{org}/mcp-servers/{bound['id']}", json={"name": "Renamed"}).status_code == 200
    with db.session() as s:
        row = s.get(McpServer, bound["id"])
        assert row is not None and row.url == "https://bound.test/mcp"


def test_allowed_hosts_mismatch_is_secret_destination_denied_and_audited(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    mcp_server.set_token(TOKEN)
    mark = len(mcp_server.seen_tokens)
    secret = factory.secret(admin, org, value=TOKEN, allowed_hosts=["api.example.com"])
    server = _settle(admin, org, _add(admin, org, mcp_server.url, secret["id"])["id"])
    assert server["status_error"]["code"] == "secret_destination_denied"
    assert mcp_server.seen_tokens[mark:] == []  # nothing was sent
    with db.session() as s:
        denial = s.scalars(select(AuditEvent).where(AuditEvent.action == "egress.denied")).one()
        assert denial.details["code"] == "secret_destination_denied" and denial.details["host"] == "127.0.0.1"


def test_private_address_with_the_allowance_off_is_egress_denied(
    mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, settings: Settings
) -> None:
    mcp_server.set_token(TOKEN)
    mark = len(mcp_server.seen_tokens)
    secret = factory.secret(admin, org, value=TOKEN)
    with extra_worker(settings, egress_allow_private=False) as (_celery, web):
        strict = Caller(web.test_client(), admin.token, admin.user_id, admin.email)
        server = _settle(strict, org, _add(strict, org, mcp_server.url, secret["id"])["id"])
    assert server["status_error"]["code"] == "egress_denied"
    assert mcp_server.seen_tokens[mark:] == []


def test_validation_works_with_the_redis_cache_down(
    mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, settings: Settings
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, value=TOKEN)
    # The broker is up, the cache (LATCHKEY_REDIS_URL) is not: resolves go to the database.
    cache_down = {"redis_url": "redis://127.0.0.1:1/0", "broker_url": settings.effective_broker_url}
    with extra_worker(settings, **cache_down) as (_c, web):
        cut = Caller(web.test_client(), admin.token, admin.user_id, admin.email)
        server = _settle(cut, org, _add(cut, org, mcp_server.url, secret["id"])["id"])
    assert server["status"] == "valid"


def test_a_redelivered_validation_changes_nothing(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, value=TOKEN)
    created = _add(admin, org, mcp_server.url, secret["id"])
    _settle(admin, org, created["id"])
    wait_job(admin.get, f"orgs/{org}/jobs/{created['job']['id']}")
    with db.session() as s:
        before = s.get(McpServer, created["id"])
        assert before is not None
        snapshot = (before.status, before.validated_at, before.tool_count)
        events = len(s.scalars(select(AuditEvent)).all())
    assert worker.send_task("mcp.validate_server", args=[created["job"]["id"]]).get(timeout=20) == "skipped"
    with db.session() as s:
        after = s.get(McpServer, created["id"])
        assert after is not None and (after.status, after.validated_at, after.tool_count) == snapshot
        assert len(s.scalars(select(AuditEvent)).all()) == events


def test_no_token_in_broker_messages_redis_job_rows_logs_or_responses(
    mcp_server: McpTestServer,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Any,
    settings: Settings,
    captured_logs: list[str],
) -> None:
    canary = "mcp-canary-" + "c" * 20
    mcp_server.set_token(canary)
    responses: list[tuple[str, str]] = []
    with parked_app(settings) as (web, queue):
        parked = Caller(web.test_client(), admin.token, admin.user_id, admin.email)
        secret = factory.secret(admin, org, value=canary)
        created = parked.post(
            f"orgs/{org}/mcp-servers", json={"name": "C", "url": mcp_server.url, "secret_ref": secret["id"]}
        )
        responses.append(("create", created.get_data(as_text=True)))
        # The message waits in the broker (nobody consumes that queue): scan it there.
        broker_dump = [*dump_broker_queue(settings, queue), *dump_redis(settings.redis_url)]
        assert any("mcp.validate_server" in text for _, text in broker_dump), "the message was not found"
        server_id = created.get_json()["id"]
    # Now the session worker runs a validation through the normal queue.
    job = admin.post(f"orgs/{org}/mcp-servers/{server_id}/validate").get_json()["job"]
    done = wait_job(admin.get, f"orgs/{org}/jobs/{job['id']}")
    assert done["result"]["status"] == "valid"
    for path in (
        f"orgs/{org}/mcp-servers/{server_id}",
        f"orgs/{org}/mcp-servers/{server_id}/tools",
        f"orgs/{org}/jobs/{job['id']}",
        f"orgs/{org}/audit-events",
    ):
        responses.append((path, admin.get(path).get_data(as_text=True)))
    leaks = find_leaks(
        [
            *broker_dump,
            *dump_redis(settings.redis_url),
            *dump_database(db.engine),
            ("logs", "\n".join(captured_logs)),
            *responses,
        ],
        [canary],
    )
    assert leaks == []


def test_a_legacy_raw_token_is_still_used_but_logged_as_deprecated(settings: Settings, legacy_url: str) -> None:
    """Before the backfill (schema expanded, not contracted), a raw token still works, counted and logged."""
    import json

    server_id, (_org, _name, legacy) = next(iter(MCP.items()))
    with McpTestServer(token=legacy) as mcp, extra_worker(settings, database_url=legacy_url) as (_p, web):
        admin = Factory(web.extensions["latchkey.db"], web.test_client()).user("acme", "admin")
        # Changing the URL of a server holding a (legacy) credential is an admin's call.
        assert admin.patch(f"orgs/acme/mcp-servers/{server_id}", json={"url": mcp.url}).status_code == 200

        def settled() -> dict[str, Any] | None:
            server: dict[str, Any] = admin.get(f"orgs/acme/mcp-servers/{server_id}").get_json()
            return server if server["status"] in ("valid", "invalid") else None

        assert wait_for(settled, timeout=30)["status"] == "valid"
        assert mcp.seen_tokens and set(mcp.seen_tokens) == {legacy}
        worker_log = Path(tempfile.gettempdir()) / f"{web.config['LATCHKEY_SETTINGS'].queue}.log"
        assert wait_for(lambda: f"MCP server {server_id} still uses a legacy raw token" in worker_log.read_text())
        assert legacy not in worker_log.read_text()
        # Worker log lines are JSON and carry the id of the job that wrote them.
        line = next(
            json.loads(raw)
            for raw in worker_log.read_text().splitlines()
            if f"MCP server {server_id} still uses" in raw
        )
        assert line["level"] == "WARNING" and line["job_id"]
        # The API never shows the legacy token.
        assert legacy not in admin.get(f"orgs/acme/mcp-servers/{server_id}").get_data(as_text=True)


def test_beat_refreshes_the_tool_lists_of_valid_servers(
    worker: Celery, mcp_server: McpTestServer, admin: Caller, org: str, factory: Factory, db: Any
) -> None:
    mcp_server.set_token(TOKEN)
    secret = factory.secret(admin, org, value=TOKEN)
    server_id = _add(admin, org, mcp_server.url, secret["id"])["id"]
    first = _settle(admin, org, server_id)["validated_at"]
    assert worker.send_task("mcp.refresh_tools").get(timeout=20) >= 1

    def revalidated() -> bool:
        body = admin.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()
        return body["status"] == "valid" and body["validated_at"] != first

    wait_for(revalidated)
    with db.session() as s:
        kinds = s.scalars(select(Job.kind).where(Job.org_id.is_not(None))).all()
        assert kinds.count("mcp.validate_server") >= 2


def test_the_web_tier_learns_that_a_legacy_token_exists_without_reading_it(legacy_db: Any) -> None:
    """Before the contract migration, moving or deleting a server with a raw token is an admin's call,
    decided with a ``token IS NOT NULL`` predicate: no statement selects the token itself."""
    import re

    from app.access import OrgAccess
    from app.errors import ForbiddenError
    from app.identity import service as identity
    from app.mcp import service as mcp_service
    from app.mcp.schemas import McpServerUpdate
    from app.models.identity import Role
    from tests.support.factories import CTX
    from tests.support.legacy_data import ORG_A
    from tests.support.statements import recorded_statements

    server_id = next(mid for mid, (org, _name, _token) in MCP.items() if org == ORG_A)
    with recorded_statements(legacy_db.engine) as statements, legacy_db.session() as s:
        member = OrgAccess(identity.get_org(s, "acme"), Role.MEMBER)
        with pytest.raises(ForbiddenError):
            mcp_service.update_server(s, CTX, member, server_id, McpServerUpdate(url="https://evil.example/mcp"))
        with pytest.raises(ForbiddenError):
            mcp_service.delete_server(s, CTX, member, server_id)
    selects_token = re.compile(
        r"SELECT\s+(?:(?!\bFROM\b).)*\bmcp_servers\.token\b(?:(?!\bFROM\b).)*\bFROM\b", re.S | re.I
    )
    assert [q for q in statements if selects_token.search(q)] == []
    assert sum("mcp_servers.token IS NOT NULL" in q for q in statements) == 2
