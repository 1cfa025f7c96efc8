"""The MCP header editor in Chromium: add and remove rows, errors next to a row, a server that turns valid."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from celery import Celery
from playwright.sync_api import Page, expect

from tests.e2e.ui.conftest import shot, sign_in
from tests.support.factories import Factory
from tests.support.mcp_server import McpTestServer
from tests.support.web import person

KEY = "ui-hdr-key-" + "k" * 24
TOKEN = "ui-hdr-token-" + "t" * 24


@pytest.fixture(scope="module")
def header_server() -> Iterator[McpTestServer]:
    with McpTestServer(require_headers={"X-API-Key": KEY, "Authorization": f"token {TOKEN}"}, bearer=False) as server:
        yield server


def test_admin_adds_a_server_with_two_header_secrets_in_the_editor(
    page: Page, worker: Celery, header_server: McpTestServer, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    hosts = [urlsplit(header_server.url).netloc]
    factory.secret(admin, org, name="UI_API_KEY", value=KEY, allowed_hosts=hosts)
    factory.secret(admin, org, name="UI_GH_TOKEN", value=TOKEN, allowed_hosts=hosts)
    sign_in(page, admin.email)
    page.goto(f"/orgs/{org}/mcp-servers/new")
    page.get_by_label("Name", exact=True).fill("Header tools")
    page.get_by_label("URL").fill(header_server.url)

    editor = page.locator("#header-editor")
    rows = editor.locator("[data-header-row]")
    expect(rows).to_have_count(1)
    expect(page.locator("#headers-0-template")).to_have_value("{{secret}}")  # prefilled
    page.locator("#headers-0-name").fill("Host")  # reserved: refused by the server, next to the field
    page.locator("#headers-0-secret_ref").select_option(label="UI_API_KEY (v1)")
    page.get_by_role("button", name="Add and validate").click()
    expect(page.locator("#headers-0-name-error")).to_contain_text("pick another header name")
    shot(page, "20-mcp-header-error")

    page.locator("#headers-0-name").fill("X-API-Key")
    # The refused row came back as typed, with one blank row after it (the editor works without JavaScript).
    expect(rows).to_have_count(2)
    page.locator("#headers-1-name").fill("X-Scratch")
    editor.get_by_role("button", name="Add header").click()
    expect(rows).to_have_count(3)
    page.locator("#headers-2-name").fill("Authorization")
    page.locator("#headers-2-template").fill("token {{secret}}")
    page.locator("#headers-2-secret_ref").select_option(label="UI_GH_TOKEN (v1)")
    # Remove the scratch row again: what is submitted is rows 0 and 2.
    rows.nth(1).get_by_role("button", name="Remove").click()
    expect(rows).to_have_count(2)
    shot(page, "21-mcp-header-editor")
    page.get_by_role("button", name="Add and validate").click()

    expect(page.locator("#mcp-status-badge")).to_have_text("valid", timeout=20_000)
    expect(page.locator("#mcp-tools")).to_contain_text("whoami")
    table = page.locator("#mcp-headers")
    expect(table).to_contain_text("X-API-Key")
    expect(table).to_contain_text("token {{secret}}")
    expect(table).to_contain_text("UI_GH_TOKEN")
    expect(table).not_to_contain_text("X-Scratch")
    shot(page, "22-mcp-header-server-valid")
    assert KEY not in page.content() and TOKEN not in page.content()
    seen = header_server.seen_headers
    assert seen and all(h.get("x-api-key") == KEY and h.get("authorization") == f"token {TOKEN}" for h in seen)
    assert not any("x-scratch" in h for h in seen)

    # The edit form holds the rows; removing one there and saving drops it (and re-validates: now 401).
    rows.filter(has=page.locator("input[value='Authorization']")).get_by_role("button", name="Remove").click()
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#mcp-status-badge")).to_have_text("invalid", timeout=20_000)
    expect(page.locator("#mcp-headers")).not_to_contain_text("Authorization")


def test_a_member_sees_the_headers_but_no_editor(
    page: Page, worker: Celery, header_server: McpTestServer, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    key = factory.secret(admin, org, name="MEMBER_VIEW_KEY", value=KEY)["id"]
    body = {
        "name": "Shared",
        "url": header_server.url,
        "headers": [{"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key}],
    }
    server = admin.post(f"orgs/{org}/mcp-servers", json=body).get_json()
    member = person(factory, org, "member")
    sign_in(page, member.email)
    page.goto(f"/orgs/{org}/mcp-servers/{server['id']}")
    expect(page.locator("#mcp-headers")).to_contain_text("MEMBER_VIEW_KEY")
    expect(page.locator("#header-editor")).to_have_count(0)
    expect(page.get_by_text("Only org admins can bind a secret")).to_be_visible()
