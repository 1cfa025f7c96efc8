"""End to end in Chromium: the real app over HTTP, the real worker, MCP server and model stand-in."""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

from celery import Celery
from playwright.sync_api import Page, expect

from tests.e2e.ui.conftest import json_fetch, mcp_server_via_api, shot, sign_in
from tests.support.factories import Factory
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.web import HIDE_SECONDS, person


def test_admin_creates_a_secret_and_an_mcp_server_that_turns_valid(
    page: Page, worker: Celery, mcp_server: McpTestServer, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    page.goto("/login")
    shot(page, "01-login")
    sign_in(page, admin.email)
    expect(page).to_have_url(re.compile(f"/orgs/{org}/secrets$"))
    shot(page, "02-secrets-empty")

    page.get_by_role("link", name="New secret").click()
    page.get_by_label("Name").fill("MCP_TOOLS_TOKEN")
    page.get_by_label("Value", exact=True).fill(mcp_server.token)
    # The test server listens on a random port: a bare host would match the default port only.
    page.get_by_label("Allowed hosts").fill(urlsplit(mcp_server.url).netloc)
    page.get_by_role("button", name="Create secret").click()
    expect(page.get_by_role("status")).to_contain_text("Secret MCP_TOOLS_TOKEN created (version 1)")
    assert mcp_server.token not in page.content()

    page.get_by_role("link", name="MCP servers").click()
    page.get_by_role("link", name="Add MCP server").click()
    page.get_by_label("Name", exact=True).fill("Tools")
    page.get_by_label("URL").fill(mcp_server.url)
    page.get_by_label("Secret sent as the bearer token").select_option(label="MCP_TOOLS_TOKEN (v1)")
    # The inline "new secret" fields only appear for "Create a new secret".
    expect(page.get_by_label("Secret value")).to_be_hidden()
    shot(page, "03-mcp-add-form")
    page.get_by_role("button", name="Add and validate").click()

    expect(page.locator("#mcp-status-badge")).to_have_text("valid", timeout=20_000)
    tools = page.locator("#mcp-tools")
    for name in ("add", "echo", "whoami"):
        expect(tools).to_contain_text(name)
    shot(page, "04-mcp-server-valid")
    assert mcp_server.token not in page.content()

    page.get_by_role("link", name="Secrets").click()
    expect(page.locator("#secrets-table")).to_contain_text("mcp server: Tools")
    shot(page, "05-secrets-list")


def test_mcp_server_with_a_new_inline_secret_and_a_readable_error(
    page: Page, worker: Celery, mcp_server: McpTestServer, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    sign_in(page, admin.email)
    page.goto(f"/orgs/{org}/mcp-servers/new")
    page.get_by_label("Name", exact=True).fill("Wrong token")
    page.get_by_label("URL").fill(mcp_server.url)
    page.get_by_label("Secret sent as the bearer token").select_option(label="+ Create a new secret…")
    page.get_by_label("Secret name").fill("WRONG_TOKEN")
    page.get_by_label("Secret value").fill("not-the-token-" + "x" * 12)
    page.get_by_role("button", name="Add and validate").click()
    expect(page.locator("#mcp-status-badge")).to_have_text("invalid", timeout=20_000)
    expect(page.locator("#mcp-error")).to_be_visible()
    shot(page, "06-mcp-server-invalid")

    # Fix it on the same page: bind the right secret (created inline), and it re-validates.
    page.get_by_label("Secret sent as the bearer token").select_option(label="+ Create a new secret…")
    page.get_by_label("Secret name").fill("RIGHT_TOKEN")
    page.get_by_label("Secret value").fill(mcp_server.token)
    # A slow server: the page shows the pending badge first, and polling brings the result in.
    mcp_server.delay_seconds = 0.3
    try:
        page.get_by_role("button", name="Save").click()
        expect(page.locator("#mcp-status-badge")).to_have_text(re.compile("pending|validating"))
        expect(page.locator("#mcp-status-badge")).to_have_text("valid", timeout=20_000)
    finally:
        mcp_server.delay_seconds = 0.0
    expect(page.locator("#mcp-tools")).to_contain_text("whoami")


def test_member_sees_no_reveal_control_and_a_forged_reveal_is_403(
    page: Page, factory: Factory, org: str, worker: Celery
) -> None:
    admin = person(factory, org)
    member = person(factory, org, "member")
    value = "sk-member-cannot-see-" + "m" * 20
    secret = factory.secret(admin, org, name="OPENAI_KEY", value=value)
    sign_in(page, member.email)
    expect(page.locator("#secrets-table")).to_contain_text("OPENAI_KEY")
    expect(page.get_by_role("link", name="New secret")).to_have_count(0)
    page.get_by_role("link", name="OPENAI_KEY").click()
    expect(page.get_by_role("button", name="Reveal")).to_have_count(0)
    expect(page.get_by_role("link", name="Edit")).to_have_count(0)
    expect(page.get_by_text("Only org admins can reveal values.")).to_be_visible()
    shot(page, "07-secret-member-view")

    token = page.locator('input[name="csrf_token"]').first.input_value()
    forged = json_fetch(page, f"/orgs/{org}/secrets/{secret['id']}/reveal", headers={"X-CSRF-Token": token})
    assert forged["status"] == 403
    assert value not in forged["text"]
    page.goto(f"/orgs/{org}/secrets/{secret['id']}/edit")
    expect(page.locator(".error-code")).to_have_text("403")
    shot(page, "08-error-403")


def test_reveal_shows_the_value_on_click_then_hides_it(page: Page, factory: Factory, org: str, worker: Celery) -> None:
    admin = person(factory, org)
    value = "sk-reveal-me-" + "r" * 24 + "END9"
    secret = factory.secret(admin, org, name="REVEAL_ME", value=value)
    sign_in(page, admin.email)
    detail = f"/orgs/{org}/secrets/{secret['id']}"
    page.goto(detail)
    # Neither the rendered page nor the HTML the server sent holds the value before the click.
    assert value not in page.content()
    raw = page.request.get(detail)
    assert value not in raw.text()
    expect(page.locator("#secret-value")).not_to_contain_text(value)
    expect(page.get_by_role("button", name="Copy")).to_be_hidden()

    with page.expect_response(re.compile(r"/reveal$")) as info:
        page.get_by_role("button", name="Reveal").click()
    response = info.value
    assert response.status == 200
    assert response.headers["cache-control"] == "no-store"
    expect(page.locator("#secret-value")).to_have_text(value)
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    expect(page.get_by_role("button", name="Reveal")).to_be_hidden()
    page.get_by_role("button", name="Copy").click()
    expect(page.locator('[data-role="status"]')).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == value
    shot(page, "09-secret-revealed")

    started = time.monotonic()
    expect(page.locator("#secret-value")).not_to_have_text(value, timeout=(HIDE_SECONDS + 5) * 1000)
    assert time.monotonic() - started >= HIDE_SECONDS - 1.5
    assert value not in page.content()
    expect(page.get_by_role("button", name="Reveal")).to_be_visible()
    expect(page.get_by_role("button", name="Copy")).to_be_hidden()
    # The reveal is on the secret's audit trail.
    page.reload()
    expect(page.locator("#audit-trail")).to_contain_text("secret.reveal")
    shot(page, "10-secret-hidden-with-audit-trail")


def test_edit_delete_and_validation_errors_next_to_the_field(page: Page, factory: Factory, org: str) -> None:
    admin = person(factory, org)
    sign_in(page, admin.email)
    page.goto(f"/orgs/{org}/secrets/new")
    page.get_by_label("Name").fill("1 not a name")
    page.get_by_label("Value", exact=True).fill("some-value-1234")
    page.get_by_role("button", name="Create secret").click()
    name = page.get_by_label("Name")
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_have_attribute("aria-describedby", re.compile(r"\bname-error\b"))
    expect(page.locator("#name-error")).to_contain_text("must start with a letter or underscore")
    expect(page.get_by_label("Value", exact=True)).to_have_value("")  # never echoed back
    shot(page, "11-secret-form-errors")

    name.fill("EDIT_ME")
    page.get_by_label("Value", exact=True).fill("first-value-1234")
    page.get_by_role("button", name="Create secret").click()
    page.get_by_role("link", name="Edit").click()
    page.get_by_label("New value").fill("second-value-5678")
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_role("status")).to_contain_text("now version 2")
    expect(page.locator("#secret-version")).to_have_text("version 2")

    # Deleting a secret in use is refused and names its users.
    secret_id = page.url.rsplit("/", 1)[-1]
    resp = admin.post(
        f"orgs/{org}/providers",
        json={"name": "Uses it", "provider_type": "openai", "model_id": "m", "secret_ref": secret_id},
    )
    assert resp.status_code == 201
    page.get_by_role("button", name="Delete secret").click()
    expect(page.locator("#delete-blocked")).to_contain_text("Provider Uses it")
    shot(page, "12-secret-delete-blocked")


def test_provider_agent_and_a_run_to_its_final_event(
    page: Page, worker: Celery, llm: LlmTestServer, mcp_server: McpTestServer, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    factory.secret(admin, org, name="MODEL_KEY", value="sk-model-key-" + "k" * 24)
    mcp_server_via_api(admin, org, factory, mcp_server)
    sign_in(page, admin.email)

    page.get_by_role("link", name="Providers").click()
    page.get_by_role("link", name="New provider").click()
    page.get_by_label("Name").fill("Local model")
    page.get_by_label("Type").select_option("openai_compatible")
    page.get_by_label("Kind").fill("openai")
    page.get_by_label("Model").fill("test-model")
    page.get_by_role("button", name="Add provider").click()
    # Server-side rules, shown next to their fields.
    expect(page.locator("#base_url-error")).to_contain_text("required for openai_compatible")
    expect(page.get_by_label("Base URL")).to_have_attribute("aria-invalid", "true")
    shot(page, "13-provider-form-errors")
    page.get_by_label("Base URL").fill(llm.url + "/v1")
    page.get_by_label("Secret holding the API key").select_option(label="MODEL_KEY (v1)")
    page.get_by_role("button", name="Add provider").click()
    expect(page.locator("#providers-table")).to_contain_text("openai/test-model")
    shot(page, "14-providers-list")

    page.get_by_role("link", name="Agents").click()
    page.get_by_role("link", name="New agent").click()
    page.get_by_label("Name", exact=True).fill("Calculator")
    page.get_by_label("Provider").select_option(label="Local model (openai/test-model)")
    add = page.get_by_role("checkbox", name=re.compile(r"^add\b"))
    expect(add).to_be_hidden()  # tools show once their server is chosen
    page.get_by_label("MCP server").select_option(label="Tools (4 tools)")
    add.check()
    shot(page, "15-agent-form")
    page.get_by_role("button", name="Create agent").click()
    expect(page.get_by_role("status")).to_contain_text("Agent Calculator created")

    llm.script(
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}], "delay_seconds": 1.0},
            {"text": "The sum is 5"},
        ]
    )
    page.get_by_label("Input").fill("What is 2 + 3?")
    page.get_by_role("button", name="Run").click()
    # The page opens on an unfinished run; its events arrive by polling.
    expect(page.locator("[data-run-status]")).to_have_attribute("data-run-status", re.compile("queued|running"))
    final = page.locator('[data-event-type="final"]')
    expect(final).to_contain_text("The sum is 5", timeout=30_000)
    events = page.locator("#run-events [data-event-type]")
    expect(events).to_have_count(4)
    assert [e.get_attribute("data-event-type") for e in events.all()] == ["status", "tool_call", "tool_result", "final"]
    expect(page.locator("[data-run-status]")).to_have_attribute("data-run-status", "succeeded")
    # The run is in the agent's history once the page is loaded again.
    page.reload()
    history = page.locator("#recent-runs tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("succeeded")
    expect(history.first).to_contain_text("What is 2 + 3?")
    shot(page, "16-agent-run")


def test_agent_form_requires_a_provider(page: Page, factory: Factory, org: str) -> None:
    member = person(factory, org, "member")
    sign_in(page, member.email)
    page.goto(f"/orgs/{org}/agents/new")
    page.get_by_label("Name", exact=True).fill("No provider")
    page.get_by_role("button", name="Create agent").click()
    provider = page.get_by_label("Provider")
    expect(provider).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#provider_id-error")).to_contain_text("is required")


def test_another_orgs_page_is_404_in_the_browser(page: Page, factory: Factory, org: str) -> None:
    admin = person(factory, org)
    other = factory.org()
    other_admin = person(factory, other)
    theirs = factory.secret(other_admin, other, name="THEIRS")
    sign_in(page, admin.email)
    for url in (f"/orgs/{other}/secrets", f"/orgs/{org}/secrets/{theirs['id']}"):
        resp = page.goto(url)
        assert resp is not None and resp.status == 404
        expect(page.locator(".error-code")).to_have_text("404")
    shot(page, "17-error-404")


def test_operator_launches_a_backfill_dry_run_and_watches_it(
    page: Page, worker: Celery, factory: Factory, org: str
) -> None:
    operator = person(factory, org, operator=True)
    sign_in(page, operator.email)
    page.get_by_role("link", name="Operator").click()
    expect(page.get_by_role("button", name="Backfill: dry run")).to_be_visible()
    page.get_by_role("button", name="Backfill: dry run").click()
    expect(page.get_by_role("status")).to_contain_text("job")
    row = page.locator('[data-job-kind="backfill.run"]').first
    expect(row).to_have_attribute("data-job-status", re.compile("succeeded|failed"), timeout=20_000)
    expect(row).to_have_attribute("data-job-status", "succeeded")
    expect(row).to_contain_text("dry_run=True")

    # The verification runs on the worker; the page then shows its record (a contracted
    # database has no legacy rows, so it passes on the live cache check alone).
    page.get_by_role("button", name="Verify the backfill").click()
    verify = page.locator('[data-job-kind="backfill.verify"]').first
    expect(verify).to_have_attribute("data-job-status", "succeeded", timeout=30_000)
    page.reload()
    expect(page.locator("#migration-columns")).to_contain_text("dropped")
    expect(page.locator("#migration-verification")).to_contain_text("passed")
    expect(page.locator("#migration-verification")).to_contain_text("cache check ok")
    shot(page, "18-operator")


def test_sign_out_everywhere_from_the_account_page(page: Page, factory: Factory, org: str) -> None:
    user = person(factory, org)
    sign_in(page, user.email)
    page.get_by_role("link", name=user.email).click()
    expect(page.get_by_role("heading", name="Signed-in sessions")).to_be_visible()
    expect(page.locator("#sessions-table")).to_contain_text("this session")
    shot(page, "account-sessions")
    page.get_by_role("button", name="Sign out everywhere").click()
    expect(page.get_by_role("status")).to_contain_text("You are signed out everywhere.")
    page.goto(f"/orgs/{org}/secrets")
    expect(page).to_have_url(re.compile("/login"))
