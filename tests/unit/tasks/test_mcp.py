"""``mcp.validate_server`` called directly: the outcome on the server and the job, and running it twice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select

from app.db import Database
from app.jobs.names import TaskName
from app.models import Job, JobStatus, McpServer, McpServerStatus, McpTool
from tests.support.factories import Caller, Factory
from tests.support.mcp_server import McpTestServer
from tests.unit.worker_support import run_task

TOKEN = "mcp-unit-token-" + "k" * 20


@pytest.fixture(scope="module")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(token=TOKEN) as server:
        yield server


def _add(factory: Factory, admin: Caller, org: str, server: McpTestServer, token: str = TOKEN) -> dict[str, Any]:
    secret = factory.secret(admin, org, value=token)["id"]
    resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": "Tools", "url": server.url, "secret_ref": secret})
    assert resp.status_code == 201, resp.get_json()
    created: dict[str, Any] = resp.get_json()
    return created


def _state(db: Database, server_id: str) -> tuple[McpServerStatus, list[str], str | None]:
    with db.session() as s:
        server = s.get(McpServer, server_id)
        assert server is not None
        tools = s.scalars(select(McpTool.name).where(McpTool.mcp_server_id == server_id).order_by(McpTool.name))
        return server.status, list(tools), server.status_error_code


def test_a_reachable_server_becomes_valid_with_its_tools(
    tasks_app: Celery, db: Database, factory: Factory, org: str, mcp_server: McpTestServer
) -> None:
    mcp_server.set_token(TOKEN)
    admin = factory.user(org, "admin")
    created = _add(factory, admin, org, mcp_server)

    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, created["job"]["id"]) == "succeeded"

    assert _state(db, created["id"]) == (McpServerStatus.VALID, ["add", "echo", "slow", "whoami"], None)
    with db.session() as s:
        job = s.get(Job, created["job"]["id"])
        assert job is not None and job.status == JobStatus.SUCCEEDED
        assert job.result == {"status": "valid", "tool_count": 4}


def test_a_refused_token_makes_the_server_invalid_and_the_job_still_succeeds(
    tasks_app: Celery, db: Database, factory: Factory, org: str, mcp_server: McpTestServer
) -> None:
    mcp_server.set_token(TOKEN)
    admin = factory.user(org, "admin")
    created = _add(factory, admin, org, mcp_server, token="wrong-" + TOKEN)

    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, created["job"]["id"]) == "succeeded"

    status, tools, code = _state(db, created["id"])
    assert (status, tools, code) == (McpServerStatus.INVALID, [], "auth_failed")
    with db.session() as s:
        job = s.get(Job, created["job"]["id"])
        assert job is not None and job.result is not None
        assert job.result["status"] == "invalid" and job.result["error"]["code"] == "auth_failed"


def test_validating_twice_changes_nothing_the_second_time(
    tasks_app: Celery, db: Database, factory: Factory, org: str, mcp_server: McpTestServer
) -> None:
    mcp_server.set_token(TOKEN)
    admin = factory.user(org, "admin")
    created = _add(factory, admin, org, mcp_server)
    job_id = created["job"]["id"]

    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, job_id) == "succeeded"
    once = _state(db, created["id"])
    # The same message again: the finished job is not run again.
    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, job_id) == "skipped"
    assert _state(db, created["id"]) == once
    # A second validation job of the unchanged server: the same outcome, no duplicate tools.
    again = admin.post(f"orgs/{org}/mcp-servers/{created['id']}/validate")
    assert again.status_code == 202, again.get_json()
    assert run_task(tasks_app, TaskName.VALIDATE_SERVER, again.get_json()["job"]["id"]) == "succeeded"
    assert _state(db, created["id"]) == once


HEADER_KEY = "mcp-unit-header-" + "h" * 20


@pytest.mark.parametrize("change", ["replaced", "cleared", "template"])
def test_a_validation_queued_before_a_header_change_ends_stale_and_sends_nothing(
    tasks_app: Celery, db: Database, factory: Factory, org: str, change: str
) -> None:
    admin = factory.user(org, "admin")
    key = factory.secret(admin, org, value=HEADER_KEY)["id"]
    with McpTestServer(require_headers={"X-API-Key": HEADER_KEY}, bearer=False) as server:
        header = {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key}
        body = {"name": "H", "url": server.url, "headers": [header]}
        created = admin.post(f"orgs/{org}/mcp-servers", json=body).get_json()
        new = {
            "replaced": [{**header, "name": "X-Other"}],
            "cleared": [],
            "template": [{**header, "template": "k {{secret}}"}],
        }
        resp = admin.patch(f"orgs/{org}/mcp-servers/{created['id']}", json={"headers": new[change]})
        assert resp.status_code == 200 and resp.get_json()["job"] is not None

        assert run_task(tasks_app, TaskName.VALIDATE_SERVER, created["job"]["id"]) == "failed"

        assert server.seen_headers == []  # not one request, with or without the secret
    with db.session() as s:
        job = s.get(Job, created["job"]["id"])
        assert job is not None and job.error_code == "stale" and "headers" in (job.error_message or "")
        assert job.resolved_secrets in (None, [])
