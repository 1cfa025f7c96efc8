"""The UI's security promises over HTTP (Flask test client): sign-in, session, CSRF, headers, tenancy, roles."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient

from app.config import Settings
from app.factory import create_app
from tests.factories import Caller, Factory
from tests.ui.conftest import PASSWORD, client_sign_in, csrf_of, person

TEMPLATES = Path(__file__).resolve().parents[2] / "app" / "web" / "templates"


# Sign-in and the session --------------------------------------------------------------------------


def test_sign_in_sets_an_http_only_same_site_cookie(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    resp = ui_client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("latchkey_session=")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # test settings: plain http on loopback
    assert resp.headers["Location"] == "/"


def test_production_session_cookie_is_secure_and_host_only(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"env": "production"}))
    try:
        assert app.config["SESSION_COOKIE_SECURE"] is True
        assert app.config["SESSION_COOKIE_NAME"] == "__Host-latchkey"
        assert app.config["SESSION_COOKIE_HTTPONLY"] is True
        assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"
    finally:
        app.extensions["latchkey.db"].dispose()


def test_sign_in_regenerates_the_session(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    before = csrf_of(ui_client.get("/login").get_data(as_text=True))
    after = client_sign_in(ui_client, user.email)
    assert after != before
    # The token from before sign-in no longer opens anything.
    resp = ui_client.post("/logout", data={"csrf_token": before})
    assert resp.status_code == 400
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 200


def test_wrong_password_and_unknown_email_get_the_same_refusal(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    wrong = ui_client.post("/login", data={"email": user.email, "password": "not-the-password", "csrf_token": token})
    unknown = ui_client.post("/login", data={"email": "nobody@example.test", "password": PASSWORD, "csrf_token": token})
    assert wrong.status_code == unknown.status_code == 401
    for resp in (wrong, unknown):
        html = resp.get_data(as_text=True)
        assert "Invalid email or password." in html
        assert 'aria-invalid="true"' in html
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 302  # still signed out


def test_repeated_failed_sign_ins_are_rate_limited(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    from app.web.auth import MAX_FAILURES_PER_EMAIL

    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    for _ in range(MAX_FAILURES_PER_EMAIL):
        resp = ui_client.post("/login", data={"email": user.email, "password": "wrong-password!", "csrf_token": token})
        assert resp.status_code == 401
    # Even the right password is refused until the window passes.
    resp = ui_client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 429
    assert "too many failed sign-ins" in resp.get_data(as_text=True)


def test_sign_out_clears_the_session(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    token = client_sign_in(ui_client, user.email)
    resp = ui_client.post("/logout", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    gone = ui_client.get(f"/orgs/{org}/secrets")
    assert gone.status_code == 302
    assert gone.headers["Location"].startswith("/login?next=")


def test_a_password_change_ends_existing_sessions(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    from app.identity import service as identity
    from tests.factories import CTX

    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    with factory.db.session() as s:
        identity.set_password(s, CTX, identity.get_user_by_email(s, user.email), "another-long-password")
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 302


def test_signed_out_visitors_go_to_sign_in_and_come_back(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    resp = ui_client.get(f"/orgs/{org}/providers")
    assert resp.status_code == 302
    assert resp.headers["Location"] == f"/login?next=/orgs/{org}/providers"
    token = csrf_of(ui_client.get(resp.headers["Location"]).get_data(as_text=True))
    back = ui_client.post(
        "/login",
        data={"email": user.email, "password": PASSWORD, "csrf_token": token, "next": f"/orgs/{org}/providers"},
    )
    assert back.headers["Location"] == f"/orgs/{org}/providers"


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example"])
def test_sign_in_never_redirects_off_site(ui_client: FlaskClient, factory: Factory, org: str, target: str) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    resp = ui_client.post(
        "/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token, "next": target}
    )
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/"


def test_home_goes_to_the_first_org_and_the_switcher_only_to_member_orgs(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    other = factory.org()
    client_sign_in(ui_client, user.email)
    assert ui_client.get("/").headers["Location"] == f"/orgs/{org}/secrets"
    assert ui_client.get(f"/switch?org={other}").status_code == 404
    assert ui_client.get(f"/switch?org={org}").headers["Location"] == f"/orgs/{org}/secrets"


# CSRF -------------------------------------------------------------------------------------------


def test_forms_without_a_valid_csrf_token_are_refused(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    # Sign-in itself needs the token (no login CSRF).
    no_token = ui_client.post("/login", data={"email": user.email, "password": PASSWORD})
    assert no_token.status_code == 400
    assert "security token" in no_token.get_data(as_text=True)
    token = client_sign_in(ui_client, user.email)
    form = {"name": "FROM_ELSEWHERE", "value": "some-value-1234"}
    for data, headers in (
        (form, {}),
        ({**form, "csrf_token": "forged"}, {}),
        ({**form, "csrf_token": token}, {"Origin": "https://evil.example"}),
    ):
        resp = ui_client.post(f"/orgs/{org}/secrets/new", data=data, headers=headers)
        assert resp.status_code == 400, resp.status_code
        html = resp.get_data(as_text=True)
        assert "This form has expired" in html
    assert "FROM_ELSEWHERE" not in ui_client.get(f"/orgs/{org}/secrets").get_data(as_text=True)
    assert ui_client.post("/logout").status_code == 400
    ok = ui_client.post(f"/orgs/{org}/secrets/new", data={**form, "csrf_token": token})
    assert ok.status_code == 302


# Headers ----------------------------------------------------------------------------------------


def test_ui_pages_send_a_strict_content_security_policy(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    for path in ("/login", f"/orgs/{org}/secrets"):
        resp = ui_client.get(path)
        csp = resp.headers["Content-Security-Policy"]
        for directive in (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ):
            assert directive in csp
        assert "unsafe" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_templates_have_no_inline_script_style_or_handlers() -> None:
    files = list(TEMPLATES.rglob("*.html"))
    assert len(files) > 10
    for path in files:
        html = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
        assert not re.search(r"\sstyle\s*=", html), path
        assert "<style" not in html, path
        assert not re.search(r"\son[a-z]+\s*=", html), path
        assert "|safe" not in html.replace(" ", "") and "autoescape false" not in html, path


def test_the_api_ignores_the_session_cookie_and_keeps_problem_json(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    resp = ui_client.get(f"/api/v1/orgs/{org}/secrets")
    assert resp.status_code == 401
    assert resp.mimetype == "application/problem+json"
    assert ui_client.get("/api/v1/nowhere").mimetype == "application/problem+json"
    page = ui_client.get("/nowhere")
    assert page.status_code == 404 and page.mimetype == "text/html"
    assert "Content-Security-Policy" not in ui_client.get("/api/v1/nowhere").headers


# Tenancy and roles ------------------------------------------------------------------------------


@dataclass
class OrgWorld:
    slug: str
    admin: Caller
    member: Caller
    ids: dict[str, str]


def _world(factory: Factory) -> OrgWorld:
    slug = factory.org()
    admin = person(factory, slug, "admin")
    member = person(factory, slug, "member")
    key = factory.secret(admin, slug, name="PROVIDER_KEY", value="sk-provider-key-" + "k" * 20)["id"]
    token = factory.secret(admin, slug, name="MCP_TOKEN", value="mcp-token-" + "t" * 20)["id"]
    provider = admin.post(
        f"orgs/{slug}/providers",
        # Loopback only: a run that reaches a worker fails fast and sends nothing off this machine.
        json={
            "name": "P",
            "provider_type": "openai_compatible",
            "kind": "openai",
            "model_id": "m",
            "config": {"base_url": "http://127.0.0.1:9/v1"},
            "secret_ref": key,
        },
    ).get_json()["id"]
    server = admin.post(
        f"orgs/{slug}/mcp-servers", json={"name": "S", "url": "http://127.0.0.1:9/mcp", "secret_ref": token}
    ).get_json()["id"]
    agent = admin.post(f"orgs/{slug}/agents", json={"name": "A", "provider_id": provider}).get_json()["id"]
    run = admin.post(f"orgs/{slug}/agents/{agent}/runs", json={"input": "hi"}).get_json()["run"]["id"]
    return OrgWorld(
        slug, admin, member, {"secret": key, "provider": provider, "mcp": server, "agent": agent, "run": run}
    )


# Every UI route under /orgs/<org>: (method, rule, who may use it in their own org).
ORG_ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/orgs/<org>/secrets", "member"),
    ("GET", "/orgs/<org>/secrets/new", "admin"),
    ("POST", "/orgs/<org>/secrets/new", "admin"),
    ("GET", "/orgs/<org>/secrets/<secret_id>", "member"),
    ("GET", "/orgs/<org>/secrets/<secret_id>/edit", "admin"),
    ("POST", "/orgs/<org>/secrets/<secret_id>/edit", "admin"),
    ("POST", "/orgs/<org>/secrets/<secret_id>/delete", "admin"),
    ("POST", "/orgs/<org>/secrets/<secret_id>/reveal", "admin"),
    ("GET", "/orgs/<org>/providers", "member"),
    ("GET", "/orgs/<org>/providers/new", "admin"),
    ("POST", "/orgs/<org>/providers/new", "admin"),
    ("GET", "/orgs/<org>/providers/<provider_id>", "member"),
    ("POST", "/orgs/<org>/providers/<provider_id>", "admin"),
    ("POST", "/orgs/<org>/providers/<provider_id>/delete", "admin"),
    ("GET", "/orgs/<org>/mcp-servers", "member"),
    ("GET", "/orgs/<org>/mcp-servers/new", "member"),
    ("POST", "/orgs/<org>/mcp-servers/new", "member"),
    ("GET", "/orgs/<org>/mcp-servers/<server_id>", "member"),
    # Changing the URL of a server with a bound secret, or deleting it, needs an admin.
    ("POST", "/orgs/<org>/mcp-servers/<server_id>", "admin"),
    ("GET", "/orgs/<org>/mcp-servers/<server_id>/status", "member"),
    ("POST", "/orgs/<org>/mcp-servers/<server_id>/validate", "member"),
    ("POST", "/orgs/<org>/mcp-servers/<server_id>/delete", "admin"),
    ("GET", "/orgs/<org>/agents", "member"),
    ("GET", "/orgs/<org>/agents/new", "member"),
    ("POST", "/orgs/<org>/agents/new", "member"),
    ("GET", "/orgs/<org>/agents/<agent_id>", "member"),
    ("POST", "/orgs/<org>/agents/<agent_id>/runs", "member"),
    ("POST", "/orgs/<org>/agents/<agent_id>/delete", "member"),
    ("GET", "/orgs/<org>/runs/<run_id>/events", "member"),
]
_PARAM_KIND = {
    "secret_id": "secret",
    "provider_id": "provider",
    "server_id": "mcp",
    "agent_id": "agent",
    "run_id": "run",
}


def _url(rule: str, slug: str, ids: dict[str, str]) -> str:
    url = rule.replace("<org>", slug)
    for param, kind in _PARAM_KIND.items():
        url = url.replace(f"<{param}>", ids[kind])
    return url


def _form_for(rule: str) -> dict[str, str]:
    # Member POSTs that pass the role check must also pass validation to prove the route is open.
    if rule.endswith("/mcp-servers/<server_id>"):
        return {"name": "S", "url": "http://127.0.0.1:8/mcp", "transport": "streamable_http"}
    return {}


def test_the_matrix_covers_every_org_route(ui_app: Flask) -> None:
    routes = {
        (method, rule.rule)
        for rule in ui_app.url_map.iter_rules()
        if rule.endpoint.startswith("web.") and "<org>" in rule.rule
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert routes == {(m, r) for m, r, _ in ORG_ROUTES}


def test_another_orgs_pages_and_ids_are_404(ui_client: FlaskClient, factory: Factory) -> None:
    mine, theirs = _world(factory), _world(factory)
    token = client_sign_in(ui_client, mine.admin.email)
    wrong: list[str] = []
    for method, rule, _who in ORG_ROUTES:
        # Their org in the path, then their ids under my org's path.
        urls = [_url(rule, theirs.slug, theirs.ids)]
        if "_id>" in rule:
            urls.append(_url(rule, mine.slug, theirs.ids))
        for url in urls:
            resp = ui_client.open(url, method=method, data={"csrf_token": token, **_form_for(rule)})
            if resp.status_code != 404:
                wrong.append(f"{method} {url} -> {resp.status_code}")
    assert not wrong, wrong
    # Nothing of theirs was touched.
    for kind, path in (("secret", "secrets"), ("provider", "providers"), ("mcp", "mcp-servers"), ("agent", "agents")):
        assert theirs.admin.get(f"orgs/{theirs.slug}/{path}/{theirs.ids[kind]}").status_code == 200


def test_admins_use_every_org_route_without_403(ui_client: FlaskClient, factory: Factory, worker: Celery) -> None:
    world = _world(factory)
    token = client_sign_in(ui_client, world.admin.email)
    refused = []
    for method, rule, _who in ORG_ROUTES:
        url = _url(rule, world.slug, world.ids)
        resp = ui_client.open(url, method=method, data={"csrf_token": token, **_form_for(rule)})
        if resp.status_code in (401, 403):
            refused.append(f"{method} {url} -> {resp.status_code}")
    assert not refused, refused


def test_members_get_403_on_admin_only_actions(ui_client: FlaskClient, factory: Factory) -> None:
    world = _world(factory)
    token = client_sign_in(ui_client, world.member.email)
    wrong: list[str] = []
    for method, rule, who in ORG_ROUTES:
        url = _url(rule, world.slug, world.ids)
        resp = ui_client.open(url, method=method, data={"csrf_token": token, **_form_for(rule)})
        refused = resp.status_code == 403
        if refused != (who == "admin"):
            wrong.append(f"{method} {url} -> {resp.status_code}")
    assert not wrong, wrong
    reveal = ui_client.post(
        _url("/orgs/<org>/secrets/<secret_id>/reveal", world.slug, world.ids), headers={"X-CSRF-Token": token}
    )
    assert reveal.status_code == 403 and reveal.mimetype == "application/json"
    assert "value" not in reveal.get_json()


def test_operator_pages_are_for_operators_only(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    admin = person(factory, org, "admin")
    token = client_sign_in(ui_client, admin.email)
    assert ui_client.get("/operator").status_code == 403
    assert ui_client.get("/operator/jobs").status_code == 403
    assert ui_client.post("/operator/launch/backfill_dry_run", data={"csrf_token": token}).status_code == 403
    operator_client = ui_client.application.test_client()
    operator = person(factory, None, operator=True)
    op_token = client_sign_in_any(operator_client, operator.email)
    assert operator_client.get("/operator").status_code == 200
    assert operator_client.post("/operator/launch/nothing", data={"csrf_token": op_token}).status_code == 404


def client_sign_in_any(client: FlaskClient, email: str) -> str:
    """Sign in a user who may have no org (the home page then goes elsewhere)."""
    token = csrf_of(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"email": email, "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    return csrf_of(client.get("/operator").get_data(as_text=True))
