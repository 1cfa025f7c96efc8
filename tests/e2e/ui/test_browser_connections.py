"""OAuth connections in Chromium: add a per-user OAuth server, Connect, approve at the authorization server's
consent page, come back connected, see it on "My connections", Disconnect."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from celery import Celery
from playwright.sync_api import Page, expect
from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from app.db import new_id
from app.identity import service as identity
from app.models import McpServer, McpTool
from tests.e2e.ui.conftest import shot, sign_in, wait_for
from tests.support.agents import agent, provider
from tests.support.factories import Factory
from tests.support.llm_server import LlmTestServer
from tests.support.oauth_server import OAuthTestServer
from tests.support.web import person


@pytest.fixture
def auth() -> Iterator[OAuthTestServer]:
    with OAuthTestServer(auto_approve=False) as server:
        yield server


def db_session(factory: Factory) -> AbstractContextManager[Session]:
    return factory.db.session()


def _org_id(factory: Factory, slug: str) -> str:
    with factory.db.session() as s:
        return identity.get_org(s, slug).id


def test_a_member_connects_approves_and_comes_back_connected(
    page: Page, worker: Celery, auth: OAuthTestServer, factory: Factory, org: str
) -> None:
    member = person(factory, org, "member")
    sign_in(page, member.email)
    page.goto(f"/orgs/{org}/mcp-servers/new")
    page.get_by_label("Name", exact=True).fill("Linear-like")
    page.get_by_label("URL").fill(auth.url)
    page.get_by_label("Authentication").select_option("oauth:user")
    page.get_by_role("button", name="Add and validate").click()
    expect(page.locator("h1")).to_have_text("Linear-like")

    # Not connected yet: the badge says so and Connect is offered.
    connection = page.locator(".connection")
    expect(connection).to_contain_text("auth_required")
    shot(page, "30-oauth-not-connected")
    connection.get_by_role("button", name="Connect").click()

    # The authorization server's own consent page (another origin), then back through /oauth/callback.
    expect(page.locator("#approve")).to_be_visible()
    assert page.url.startswith(auth.issuer)
    page.locator("input[name=user]").fill("maria")
    shot(page, "31-oauth-consent")
    page.locator("#approve").click()
    expect(page.locator(".flash, .alert").first).to_contain_text("Connected to Linear-like")
    expect(page.locator("h1")).to_have_text("Linear-like")

    def connected() -> Any:
        page.reload()
        text = page.locator(".connection").inner_text()
        return "connected" in text and "auth_required" not in text

    wait_for(connected, 20)
    expect(page.locator(".connection")).to_contain_text("yours")
    shot(page, "32-oauth-connected")
    # The exchange validated the server with the new token: its tools are listed.
    wait_for(lambda: (page.reload(), "whoami" in page.content())[1], 20)

    page.goto(f"/orgs/{org}/connections")
    row = page.locator("#connections-table tr", has_text="Linear-like")
    expect(row).to_contain_text("connected")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Disconnect").click()
    expect(page.locator(".flash, .alert").first).to_contain_text("Disconnected")
    page.goto(f"/orgs/{org}/connections")
    expect(page.locator("#connections-table")).to_contain_text("auth_required")
    assert wait_for(lambda: auth.revoked, 20)


def test_a_run_without_the_users_connection_offers_connect(
    page: Page, worker: Celery, auth: OAuthTestServer, factory: Factory, org: str, llm: LlmTestServer
) -> None:
    admin = person(factory, org, "admin")
    member = person(factory, org, "member")
    created = admin.post(
        f"orgs/{org}/mcp-servers",
        json={"name": "Per-user tools", "url": auth.url, "auth": {"type": "oauth", "scope": "user"}},
    )
    server_id = created.get_json()["id"]
    # Its first validation ends auth_required (nobody is connected); then it is given a tool list,
    # as a member's connection would have.
    wait_for(lambda: admin.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()["status"] == "invalid", 20)
    with db_session(factory) as s:
        s.execute(
            insert(McpTool).values(
                id=new_id(), org_id=_org_id(factory, org), mcp_server_id=server_id, name="whoami", input_schema={}
            )
        )
        s.execute(update(McpServer).where(McpServer.id == server_id).values(status="valid", tool_count=1))
    provider_id, _ = provider(admin, org, factory, llm)
    agent_id = agent(admin, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "whoami"}])

    sign_in(page, member.email)
    page.goto(f"/orgs/{org}/agents/{agent_id}")
    page.get_by_label("Input").fill("who am I?")
    page.get_by_role("button", name="Run").click()
    expect(page.locator(".alert-error")).to_contain_text("auth required", timeout=20_000)
    offer = page.locator("[data-connect-offer]")
    expect(offer).to_contain_text("Per-user tools")
    shot(page, "33-run-needs-connection")
    offer.get_by_role("button", name="Connect").click()
    expect(page.locator("#approve")).to_be_visible()
    assert len(llm.requests) == 0  # the model was never asked
