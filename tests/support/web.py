"""Signing in to the UI, for the test-client tests (tests/functional/web) and the browser tests (tests/e2e/ui)."""

from __future__ import annotations

import re

from flask.testing import FlaskClient

from tests.support.factories import Caller, Factory

PASSWORD = "correct-horse-battery-staple"
# Short enough that the reveal test does not wait long; the default is 30 s.
HIDE_SECONDS = 2

_CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def person(factory: Factory, org: str | None, role: str = "admin", *, operator: bool = False) -> Caller:
    """A user who can sign in (password :data:`PASSWORD`) and call the API (token)."""
    return factory.user(org, role, operator=operator, password=PASSWORD)


def csrf_of(html: str) -> str:
    match = _CSRF_RE.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def client_sign_in(client: FlaskClient, email: str, password: str = PASSWORD) -> str:
    """Sign a test client in; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").get_data(as_text=True))
    resp = client.post("/login", data={"email": email, "password": password, "csrf_token": token})
    assert resp.status_code == 302, resp.get_data(as_text=True)
    home = client.get(resp.headers["Location"], follow_redirects=True)
    return csrf_of(home.get_data(as_text=True))
