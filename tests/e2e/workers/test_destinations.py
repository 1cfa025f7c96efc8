"""Destinations are bound at run time: a job sends a credential only where it was bound when queued.

A worker is held (SIGSTOP) while a job waits, the destination is changed through the API, and
the worker resumes: the job ends ``stale`` before resolving anything, and the recording servers
(the real MCP test server, the model-API stand-in) receive no credential.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from flask import Flask
from sqlalchemy import select

from app.config import Settings
from app.db import Database
from app.factory import create_app
from app.models import AuditEvent, McpServer
from app.tasks import mcp as mcp_tasks
from app.tasks.runtime import worker_context
from tests.support.agents import agent, provider
from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.processes import drop_queue, spawned_worker
from tests.support.workers import extra_worker, parked_app, wait_for, wait_job

TOKEN = "dest-mcp-token-" + "d" * 24
PROVIDER_KEY = "sk-dest-provider-" + "k" * 24
OTHER_KEY = "sk-dest-other-" + "o" * 24


class Held:
    """A worker process on a queue of its own, the web app publishing to it, and a way to hold it."""

    def __init__(self, web: Flask, proc: subprocess.Popen[bytes], producer: Celery) -> None:
        self.web = web
        self.proc = proc
        self.producer = producer
        self.db: Database = web.extensions["latchkey.db"]

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The worker is stopped (SIGSTOP) inside the block and resumed (SIGCONT) after it."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def factory(self) -> Factory:
        return Factory(self.db, self.web.test_client())


@pytest.fixture(scope="module")
def held(settings: Settings, tmp_root: Path) -> Iterator[Held]:
    custom = settings.model_copy(update={"queue": f"latchkey-held-{uuid.uuid4().hex[:10]}"})
    web = create_app(custom)
    try:
        with spawned_worker(custom, tmp_root / f"{custom.queue}.log", concurrency=2) as (proc, producer):
            yield Held(web, proc, producer)
    finally:
        web.extensions["latchkey.db"].dispose()
        drop_queue(settings, custom.queue)


def _settle(caller: Caller, org: str, server_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = caller.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()
        return body if body["status"] in ("valid", "invalid") else None

    result: dict[str, Any] = wait_for(done, 30)
    return result


def _server(caller: Caller, org: str, url: str, secret_ref: str | None) -> str:
    body = {"name": "Files", "url": url, **({"secret_ref": secret_ref} if secret_ref else {})}
    resp = caller.post(f"orgs/{org}/mcp-servers", json=body)
    assert resp.status_code == 201, resp.get_json()
    server_id: str = resp.get_json()["id"]
    assert _settle(caller, org, server_id)["status"] == "valid"
    # Until the job itself is finished, the worker may be inside a write (held, it would keep the lock).
    wait_job(caller.get, f"orgs/{org}/jobs/{resp.get_json()['job']['id']}")
    return server_id


def _stale_events(db: Database) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == "egress.stale")))


def _assert_stale(job: dict[str, Any]) -> None:
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "stale"
    assert "changed after this job was queued" in job["error"]["message"]


def test_a_validation_queued_before_an_unbind_and_a_repoint_sends_nothing(held: Held, db: Database) -> None:
    f = held.factory()
    org = f.org()
    admin, member = f.user(org, "admin"), f.user(org, "member")
    with McpTestServer(token=TOKEN) as good, McpTestServer(token=TOKEN) as attacker:
        secret = f.secret(admin, org, value=TOKEN)
        server_id = _server(admin, org, good.url, secret["id"])
        with held.paused():
            # A member may ask for a validation: it sends the admin's secret where the admin allowed.
            job = member.post(f"orgs/{org}/mcp-servers/{server_id}/validate").get_json()["job"]
            assert admin.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"secret_ref": None}).status_code == 200
            # Now unbound, the member may move the server to their own host.
            moved = member.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"url": attacker.url})
            assert moved.status_code == 200, moved.get_json()
        done = wait_job(admin.get, f"orgs/{org}/jobs/{job['id']}", timeout=30)
        assert _settle(admin, org, server_id)["status"] in ("valid", "invalid")  # the re-point's own validation
        assert TOKEN not in attacker.seen_tokens and attacker.seen_tokens == []
        _assert_stale(done)
    (event,) = [e for e in _stale_events(db) if e.details["job_id"] == job["id"]]
    assert event.target_id == server_id and event.org_id is not None
    assert event.details["changed"] == ["secret_ref", "url"]
    assert TOKEN not in str(event.details)


def test_a_beat_refresh_queued_before_a_repoint_sends_nothing(held: Held, db: Database) -> None:
    f = held.factory()
    org = f.org()
    admin = f.user(org, "admin")
    with McpTestServer(token=TOKEN) as good, McpTestServer(token=TOKEN) as elsewhere:
        secret = f.secret(admin, org, value=TOKEN)
        server_id = _server(admin, org, good.url, secret["id"])
        with held.paused(), parked_app(held.web.config["LATCHKEY_SETTINGS"]) as (parked, _queue):
            # Beat's task body queues one validation per valid server onto the held worker's queue.
            refresh = held.producer.tasks[mcp_tasks.refresh_tools.name]
            assert refresh.apply().get() == 1
            worker_context(held.producer).close()
            # An admin re-points the server (its own validation waits on a queue nobody consumes).
            admin_parked = Caller(parked.test_client(), admin.token, admin.user_id, admin.email)
            moved = admin_parked.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"url": elsewhere.url})
            assert moved.status_code == 200
            mark = len(good.seen_tokens)

            def refresh_done() -> bool:
                return any(e.target_id == server_id for e in _stale_events(db))

            # (resumed on leaving the block)
        wait_for(refresh_done, 30)
        assert elsewhere.seen_tokens == [] and good.seen_tokens[mark:] == []
    with db.session() as s:
        row = s.get(McpServer, server_id)
        assert row is not None and row.status == "pending"  # left to the re-point's validation


def _queue_run(caller: Caller, org: str, agent_id: str) -> tuple[str, str]:
    resp = caller.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": "hello"})
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["run"]["id"], resp.get_json()["job"]["id"]


def _finished_run(caller: Caller, org: str, run_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = caller.get(f"orgs/{org}/runs/{run_id}").get_json()
        return run if run["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = wait_for(finished, 30)
    return result


@pytest.mark.parametrize("change", ["base_url", "secret_ref"])
def test_an_agent_run_queued_before_its_provider_changed_sends_nothing(held: Held, db: Database, change: str) -> None:
    f = held.factory()
    org = f.org()
    admin, member = f.user(org, "admin"), f.user(org, "member")
    with LlmTestServer() as llm, LlmTestServer() as attacker:
        provider_id, _secret = provider(admin, org, f, llm, key=PROVIDER_KEY)
        other = f.secret(admin, org, value=OTHER_KEY)["id"]
        agent_id = agent(member, org, provider_id)
        with held.paused():
            run_id, job_id = _queue_run(member, org, agent_id)
            patch = {"config": {"base_url": attacker.url + "/v1"}} if change == "base_url" else {"secret_ref": other}
            assert admin.patch(f"orgs/{org}/providers/{provider_id}", json=patch).status_code == 200
        run = _finished_run(member, org, run_id)
        assert llm.requests == [] and attacker.requests == []  # no model call at all
        assert (run["status"], run["error"]["code"]) == ("failed", "stale")
        assert run["events"][-1]["type"] == "error" and run["events"][-1]["code"] == "stale"
        _assert_stale(wait_job(member.get, f"orgs/{org}/jobs/{job_id}"))
    (event,) = [e for e in _stale_events(db) if e.details["job_id"] == job_id]
    assert event.target_type == "agent_run" and event.target_id == run_id
    assert event.details["changed"] == (
        ["provider.config.base_url"] if change == "base_url" else ["provider.secret_ref"]
    )


def test_an_agent_run_queued_before_its_tool_server_was_repointed_sends_nothing(
    held: Held, db: Database, settings: Settings
) -> None:
    f = held.factory()
    org = f.org()
    admin = f.user(org, "admin")
    with LlmTestServer() as llm, McpTestServer(token=TOKEN) as good, McpTestServer(token=TOKEN) as elsewhere:
        provider_id, _secret = provider(admin, org, f, llm, key=PROVIDER_KEY)
        secret = f.secret(admin, org, value=TOKEN)["id"]
        server_id = _server(admin, org, good.url, secret)
        agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "add"}])
        llm.script([{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, {"text": "3"}])
        with held.paused():
            run_id, job_id = _queue_run(admin, org, agent_id)
            # Re-pointed (by an admin, the secret still bound), and re-validated there by another
            # worker before the held one resumes: the server is `valid` again, at the new URL.
            with parked_app(held.web.config["LATCHKEY_SETTINGS"]) as (parked, queue):
                admin_parked = Caller(parked.test_client(), admin.token, admin.user_id, admin.email)
                moved = admin_parked.patch(f"orgs/{org}/mcp-servers/{server_id}", json={"url": elsewhere.url})
                assert moved.status_code == 200
                with extra_worker(settings, queue=queue):
                    assert _settle(admin, org, server_id)["status"] == "valid"
            mark = len(elsewhere.seen_tokens)
        run = _finished_run(admin, org, run_id)
        assert elsewhere.seen_tokens[mark:] == []  # no tool call went to the new URL
        assert llm.requests == []
        assert (run["status"], run["error"]["code"]) == ("failed", "stale")
    (event,) = [e for e in _stale_events(db) if e.details["job_id"] == job_id]
    assert event.details["changed"] == ["mcp_servers"]
