"""Browser tests: the real app served over HTTP from a thread, driven by Debian's Chromium.

The server is the app ``create_app`` builds from the test settings; jobs go to the session's
real worker process; MCP validation talks to the real MCP test server; runs call the model
stand-in. Chromium must be installed (``.ci/run`` installs it): without it these tests fail.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from werkzeug.serving import make_server

from tests.support.factories import Caller, Factory
from tests.support.mcp_server import McpTestServer
from tests.support.web import PASSWORD

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MCP_TOKEN = "mcp-ui-token-" + "u" * 24
# One folder per backend, so the two CI runs (side by side) never write the same file.
ARTIFACTS = (
    Path(__file__).resolve().parents[3]
    / "test-artifacts"
    / ("ui-sqlite" if os.environ.get("LATCHKEY_TEST_BACKEND") == "sqlite" else "ui")
)


@pytest.fixture(scope="session")
def live_server(ui_app: Flask, ui_port: int) -> Iterator[str]:
    """The UI over real HTTP on 127.0.0.1 (a thread per request, as reveals wait on a worker), on the
    port of the settings' public URL, where OAuth authorization servers send the browser back."""
    server = make_server("127.0.0.1", ui_port, ui_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="ui-live-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


# Package scope, not session: while Playwright's sync API is open, the main thread has a running
# event loop, so any later test calling asyncio.run() (tests/unit/egress, tests/unit/mcp) would fail.
@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (.ci/run does)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, live_server: str) -> Iterator[Page]:
    """A fresh browser context (no cookies) per test; any CSP violation fails the test."""
    context = browser.new_context(base_url=live_server, viewport={"width": 1366, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_server)
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    violations: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if "Content Security Policy" in msg.text or "Content-Security-Policy" in msg.text:
            violations.append(msg.text)

    pg.on("console", on_console)
    pg.on("dialog", lambda dialog: dialog.accept())
    yield pg
    context.close()
    assert not violations, violations


@pytest.fixture(scope="session")
def mcp_server() -> Iterator[McpTestServer]:
    with McpTestServer(token=MCP_TOKEN) as server:
        yield server


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def shot(page: Page, name: str) -> None:
    """A full-page screenshot under test-artifacts/ui/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, email: str, password: str = PASSWORD) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def mcp_server_via_api(admin: Caller, org: str, factory: Factory, server: McpTestServer, name: str = "Tools") -> str:
    """A validated MCP server (through the API), for tests about what comes after."""
    secret = factory.secret(admin, org, name=f"{name.upper()}_TOKEN", value=server.token)["id"]
    resp = admin.post(f"orgs/{org}/mcp-servers", json={"name": name, "url": server.url, "secret_ref": secret})
    assert resp.status_code == 201, resp.get_json()
    server_id: str = resp.get_json()["id"]

    def valid() -> bool:
        return bool(admin.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()["status"] == "valid")

    wait_for(valid)
    return server_id


def json_fetch(page: Page, url: str, method: str = "POST", headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A fetch from inside the page (same cookies, same origin): status and parsed body."""
    result: dict[str, Any] = page.evaluate(
        """async ([url, method, headers]) => {
            const resp = await fetch(url, {method, headers, credentials: "same-origin"});
            const text = await resp.text();
            return {status: resp.status, text, cache: resp.headers.get("Cache-Control")};
        }""",
        [url, method, headers or {}],
    )
    return result
