"""The UI's security promises over HTTP (Flask test client): sign-in, session, CSRF, headers, tenancy, roles."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import select, update
from werkzeug.test import TestResponse

from app.config import Settings
from app.db import utcnow
from app.factory import create_app
from app.identity import service as identity
from app.models import Membership, User, WebSession
from tests.support.factories import Caller, Factory
from tests.support.web import PASSWORD, client_sign_in, csrf_of, person

TEMPLATES = Path(__file__).resolve().parents[3] / "app" / "web" / "templates"


# Sign-in and the session --------------------------------------------------------------------------


def test_sign_in_sets_an_http_only_same_site_cookie(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    resp = ui_client.post("/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    (cookie,) = [c for c in resp.headers.getlist("Set-Cookie") if c.startswith("latchkey_session=")]
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


def _login(client: FlaskClient, email: str, password: str, address: str = "127.0.0.1") -> TestResponse:
    token = csrf_of(client.get("/login").get_data(as_text=True))
    return client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": address},
    )


@contextmanager
def _app_with(settings: Settings, **overrides: Any) -> Iterator[Flask]:
    """The real app with other sign-in settings (same database and Redis)."""
    application = create_app(settings.model_copy(update=overrides))
    try:
        yield application
    finally:
        application.extensions["latchkey.db"].dispose()


def test_failed_sign_ins_lock_the_pair_not_the_owner(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    free = ui_client.application.config["LATCHKEY_SETTINGS"].login_free_failures_per_pair
    attacker = "198.51.100.7"
    for _ in range(free):
        assert _login(ui_client, user.email, "wrong-password!", attacker).status_code == 401
    # The pair is locked: even the right password is refused from there, with a Retry-After.
    locked = _login(ui_client, user.email, PASSWORD, attacker)
    assert locked.status_code == 429
    assert "too many failed sign-ins" in locked.get_data(as_text=True)
    assert int(locked.headers["Retry-After"]) >= 1
    # The owner, from their own address, is not locked out.
    owner = ui_client.application.test_client()
    assert _login(owner, user.email, PASSWORD, "203.0.113.20").status_code == 302
    assert owner.get(f"/orgs/{org}/secrets").status_code == 200


def test_sign_in_backs_off_exponentially_and_success_resets_the_pair(
    settings: Settings, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    base = 3
    with _app_with(settings, login_free_failures_per_pair=2, login_backoff_base_seconds=base) as application:
        client = application.test_client()
        address = "198.51.100.8"
        # One failure, then the right password: the pair starts afresh.
        assert _login(client, user.email, "wrong-password!", address).status_code == 401
        assert _login(application.test_client(), user.email, PASSWORD, address).status_code == 302
        assert _login(client, user.email, "wrong-password!", address).status_code == 401
        # The second failure locks the pair for base * 2^0 = 3 s (the wait counts from the attempt) ...
        assert _login(client, user.email, "wrong-password!", address).status_code == 401
        first = _login(client, user.email, PASSWORD, address)
        assert first.status_code == 429 and 1 <= int(first.headers["Retry-After"]) <= base
        time.sleep(base + 0.2)
        # ... the next failure for base * 2^1 = 6 s: the delay doubles per failure.
        assert _login(client, user.email, "wrong-password!", address).status_code == 401
        second = _login(client, user.email, PASSWORD, address)
        assert second.status_code == 429 and base < int(second.headers["Retry-After"]) <= 2 * base


@pytest.mark.parametrize(
    ("overrides", "many_addresses"),
    [
        # One address guessing one email: the (email, address) pair's allowance.
        ({"login_free_failures_per_pair": 10}, False),
        # Twenty addresses guessing one email: the per-email ceiling.
        ({"login_free_failures_per_pair": 1000, "login_max_failures_per_email": 10}, True),
    ],
    ids=["pair", "email-ceiling"],
)
def test_concurrent_guesses_are_counted_before_they_are_verified(
    settings: Settings, factory: Factory, org: str, overrides: dict[str, int], many_addresses: bool
) -> None:
    user = person(factory, org)
    guesses = 20
    # 20 sign-ins at once on 2 cores (argon2 and an in-process fakeredis share them): the
    # limiter's Redis calls get time to answer, so every refusal here is the limit's.
    with _app_with(
        settings, login_max_failures_per_address=1000, redis_timeout_seconds=15.0, **overrides
    ) as application:
        clients = [application.test_client() for _ in range(guesses)]
        tokens = [csrf_of(c.get("/login").get_data(as_text=True)) for c in clients]
        start = threading.Barrier(guesses)
        statuses: list[int] = []
        lock = threading.Lock()

        def guess(i: int) -> None:
            address = f"198.51.100.{100 + i}" if many_addresses else "198.51.100.99"
            start.wait()
            resp = clients[i].post(
                "/login",
                data={"email": user.email, "password": f"wrong-guess-{i}", "csrf_token": tokens[i]},
                environ_base={"REMOTE_ADDR": address},
            )
            with lock:
                statuses.append(resp.status_code)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(guesses)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    # A 401 is a guess whose password was checked; a 429 was refused before any check.
    assert sorted(statuses) == [401] * 10 + [429] * 10, statuses


DEVICE_COOKIE = "latchkey_device"


def _browser(application: Flask, device: str | None = None) -> FlaskClient:
    """A fresh browser, optionally holding a known-device cookie from an earlier sign-in."""
    client = application.test_client()
    if device is not None:
        client.set_cookie(DEVICE_COOKIE, device)
    return client


def _device_cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(DEVICE_COOKIE)
    assert cookie is not None
    return cookie.value


def test_sign_in_sets_a_signed_long_lived_known_device_cookie(settings: Settings, factory: Factory, org: str) -> None:
    user = person(factory, org)
    for env, name, secure in (("development", DEVICE_COOKIE, False), ("production", "__Host-latchkey-device", True)):
        with _app_with(settings, env=env) as application:
            resp = _login(application.test_client(), user.email, PASSWORD)
            assert resp.status_code == 302
            (header,) = [h for h in resp.headers.getlist("Set-Cookie") if h.startswith(f"{name}=")]
            assert "HttpOnly" in header and "SameSite=Lax" in header and "Path=/" in header
            assert ("Secure" in header) is secure and "Domain" not in header
            assert f"Max-Age={settings.login_device_cookie_seconds}" in header
            value = header.split(";", 1)[0].split("=", 1)[1]
            data = URLSafeTimedSerializer(application.config["SECRET_KEY"], salt="latchkey/device-cookie").loads(value)
            assert data["uid"] == user.user_id and data["email"] == user.email
            # A failed sign-in makes no device known.
            failed = _login(_browser(application), user.email, "wrong-password!")
            assert failed.status_code == 401
            assert not [h for h in failed.headers.getlist("Set-Cookie") if "device" in h]


@pytest.mark.parametrize("ceiling", ["email", "address"])
def test_a_known_device_is_not_locked_out_by_the_ceilings(
    settings: Settings, factory: Factory, org: str, ceiling: str
) -> None:
    owner, other = person(factory, org), person(factory, org)
    home = "203.0.113.40"
    with _app_with(
        settings, login_max_failures_per_email=3, login_max_failures_per_address=3, login_free_failures_per_pair=2
    ) as application:
        browser = _browser(application)
        assert _login(browser, owner.email, PASSWORD, home).status_code == 302
        device = _device_cookie_of(browser)
        # An attacker fills the ceiling: one email from many addresses, or many emails from one address.
        for i in range(3):
            email, address = (
                (owner.email, f"198.51.100.{40 + i}") if ceiling == "email" else (f"x{i}@example.test", home)
            )
            assert _login(_browser(application), email, "wrong-password!", address).status_code == 401
        clean = "203.0.113.41" if ceiling == "email" else home
        # Without the device cookie even the right password is refused ...
        assert _login(_browser(application), owner.email, PASSWORD, clean).status_code == 429
        # ... and so with a forged one, or one issued to another email.
        assert _login(_browser(application, device + "x"), owner.email, PASSWORD, clean).status_code == 429
        if ceiling == "address":
            assert _login(_browser(application, device), other.email, PASSWORD, clean).status_code == 429
        # The owner's browser is known: the ceilings do not apply to it.
        assert _login(_browser(application, device), owner.email, PASSWORD, clean).status_code == 302
        # It has its own per-(email, device) back-off: two failures lock that device.
        for _ in range(2):
            assert _login(_browser(application, device), owner.email, "wrong-password!", clean).status_code == 401
        assert _login(_browser(application, device), owner.email, PASSWORD, clean).status_code == 429


def test_ipv6_clients_are_counted_by_their_64_prefix(settings: Settings, factory: Factory, org: str) -> None:
    user = person(factory, org)
    with _app_with(settings, login_free_failures_per_pair=2) as application:
        # Two failures from two addresses of one /64: that pair is now locked ...
        for address in ("2001:db8:7:1::1", "2001:db8:7:1::2"):
            assert _login(_browser(application), user.email, "wrong-password!", address).status_code == 401
        assert _login(_browser(application), user.email, PASSWORD, "2001:db8:7:1:ffff::9").status_code == 429
        # ... while the next /64 is another client.
        assert _login(_browser(application), user.email, PASSWORD, "2001:db8:7:2::1").status_code == 302


def test_limiter_keys_hold_an_hmac_of_the_email_not_its_hash(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    application = ui_client.application
    assert _login(ui_client, user.email, "wrong-password!", "198.51.100.61").status_code == 401
    base = f"lk:rl:login:{application.config['LATCHKEY_SETTINGS'].queue}"
    redis = application.extensions["latchkey.redis"]
    keys = {k.decode() if isinstance(k, bytes) else k for k in redis.scan_iter(f"{base}:*")}
    # SHA-256 of a guessed address would confirm it to anyone who can read Redis.
    plain = hashlib.sha256(user.email.encode()).hexdigest()[:32]
    assert keys and not any(plain in k for k in keys)
    subkey = hmac.new(application.config["SECRET_KEY"].encode(), b"latchkey/login-limit", hashlib.sha256).digest()
    keyed = hmac.new(subkey, user.email.encode(), hashlib.sha256).hexdigest()[:32]
    assert f"{base}:email:{keyed}" in keys


def test_sign_in_fails_closed_when_the_limiter_is_unavailable(settings: Settings, factory: Factory, org: str) -> None:
    user = person(factory, org)
    with _app_with(settings, redis_url="redis://127.0.0.1:1/0") as application:
        client = application.test_client()
        resp = _login(client, user.email, PASSWORD)
        assert resp.status_code == 503
        assert "sign-in is unavailable" in resp.get_data(as_text=True)
        assert client.get(f"/orgs/{org}/secrets").status_code == 302  # not signed in


def _cookie(client: FlaskClient) -> str:
    cookie = client.get_cookie("latchkey_session")
    assert cookie is not None
    return cookie.value


def _with_cookie(client: FlaskClient, value: str) -> FlaskClient:
    other = client.application.test_client()
    other.set_cookie("latchkey_session", value)
    return other


def _sessions_of(factory: Factory, user_id: str) -> list[WebSession]:
    with factory.db.session() as s:
        rows = list(s.scalars(select(WebSession).where(WebSession.user_id == user_id)))
        s.expunge_all()
        return rows


def test_the_cookie_names_a_server_side_session_and_holds_no_user_id(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    data = ui_client.application.session_interface.get_signing_serializer(ui_client.application).loads(  # type: ignore[attr-defined]
        _cookie(ui_client)
    )
    assert set(data) - {"_permanent"} == {"sid", "pwf", "csrf", "org"}
    (row,) = _sessions_of(factory, user.user_id)
    # Only the SHA-256 of the cookie's id is stored; the absolute expiry is the 12 h default.
    assert row.token_hash == hashlib.sha256(data["sid"].encode()).hexdigest() != data["sid"]
    assert row.expires_at - row.created_at == timedelta(hours=12)
    assert row.revoked_at is None and row.ip == "127.0.0.1"


def test_sign_out_ends_the_session_server_side(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    token = client_sign_in(ui_client, user.email)
    copied = _cookie(ui_client)
    assert _with_cookie(ui_client, copied).get(f"/orgs/{org}/secrets").status_code == 200
    resp = ui_client.post("/logout", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    gone = ui_client.get(f"/orgs/{org}/secrets")
    assert gone.status_code == 302
    assert gone.headers["Location"].startswith("/login?next=")
    # A copy of the cookie taken before sign-out no longer opens anything.
    replay = _with_cookie(ui_client, copied).get(f"/orgs/{org}/secrets")
    assert replay.status_code == 302 and replay.headers["Location"].startswith("/login")
    assert all(r.revoked_at is not None for r in _sessions_of(factory, user.user_id))


def test_signing_in_again_ends_the_previous_session(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    first, second = person(factory, org), person(factory, org)
    token = client_sign_in(ui_client, first.email)
    old = _cookie(ui_client)
    # The same browser signs in again (here as someone else) without signing out first.
    resp = ui_client.post("/login", data={"email": second.email, "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 200
    replay = _with_cookie(ui_client, old).get(f"/orgs/{org}/secrets")
    assert replay.status_code == 302 and replay.headers["Location"].startswith("/login")
    (row,) = _sessions_of(factory, first.user_id)
    assert row.revoked_at is not None
    (current,) = _sessions_of(factory, second.user_id)
    assert current.revoked_at is None


def test_a_session_ends_at_its_absolute_expiry(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 200
    with factory.db.session() as s:  # twelve hours later, however active the session was
        s.execute(
            update(WebSession)
            .where(WebSession.user_id == user.user_id)
            .values(expires_at=utcnow() - timedelta(seconds=1), last_seen_at=utcnow())
        )
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 302


def test_last_seen_is_written_at_most_once_a_minute(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    (first,) = _sessions_of(factory, user.user_id)
    for _ in range(3):
        assert ui_client.get(f"/orgs/{org}/secrets").status_code == 200
    (same,) = _sessions_of(factory, user.user_id)
    assert same.last_seen_at == first.last_seen_at
    earlier = utcnow() - timedelta(minutes=2)
    with factory.db.session() as s:
        s.execute(update(WebSession).where(WebSession.user_id == user.user_id).values(last_seen_at=earlier))
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 200
    (later,) = _sessions_of(factory, user.user_id)
    assert later.last_seen_at is not None and later.last_seen_at > earlier + timedelta(minutes=1)


def test_sign_out_everywhere_from_the_ui(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    token = client_sign_in(ui_client, user.email)
    laptop = ui_client.application.test_client()
    client_sign_in(laptop, user.email)
    page = ui_client.get("/account")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert html.count("<tr>") == 3 and "this session" in html and "Sign out everywhere" in html
    resp = ui_client.post("/account/sessions/revoke", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    for client in (ui_client, laptop):
        assert client.get(f"/orgs/{org}/secrets").status_code == 302
    assert all(r.revoked_at is not None for r in _sessions_of(factory, user.user_id))
    # API tokens are not sessions: they keep working.
    assert user.get("me").status_code == 200


def test_sign_out_everywhere_through_the_api(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    other = person(factory, org)
    other_client = ui_client.application.test_client()
    client_sign_in(other_client, other.email)
    assert user.delete("me/sessions").status_code == 204
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 302
    assert other_client.get(f"/orgs/{org}/secrets").status_code == 200  # only the caller's sessions
    assert ui_client.application.test_client().delete("/api/v1/me/sessions").status_code == 401


def test_a_password_change_ends_existing_sessions(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    from app.identity import service as identity
    from app.identity.schemas import PasswordSet
    from tests.support.factories import CTX

    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    with factory.db.session() as s:
        identity.set_password(
            s, CTX, identity.get_user_by_email(s, user.email), PasswordSet(password="another-long-password")
        )
    assert ui_client.get(f"/orgs/{org}/secrets").status_code == 302
    # The rows are revoked too, not only refused by the password fingerprint.
    assert all(r.revoked_at is not None for r in _sessions_of(factory, user.user_id))


def test_a_disabled_user_is_signed_out(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    with factory.db.session() as s:
        s.execute(update(User).where(User.id == user.user_id).values(disabled_at=utcnow()))
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


HOSTILE_NEXT = [
    "//evil.example/x",
    "https://evil.example/",
    "https:evil.example",
    "javascript:alert(1)",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",  # what ?next=/%09/evil.example decodes to
    "/\n/evil.example",
    "/\r\n/evil.example",
    "\t//evil.example",
    " //evil.example",
    "/\x00/evil.example",
    "/\x7f/evil.example",
    "/%09/evil.example",  # the same, still encoded (a proxy or a second redirect may decode it)
    "/%2F/evil.example",
    "/%2f%2fevil.example",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%252F/evil.example",  # double-encoded
    "evil.example",
    "/" + "a" * 3000,
]


def _same_site(location: str) -> bool:
    return (
        location.startswith("/")
        and location[1:2] not in ("/", "\\")
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in location)
    )


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_sign_in_never_redirects_off_site(ui_client: FlaskClient, factory: Factory, org: str, target: str) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    resp = ui_client.post(
        "/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token, "next": target}
    )
    assert resp.status_code == 302
    assert resp.headers["Location"] == "/"
    # Signed in, GET /login?next=... redirects at once: the raw query string, decoded by the server.
    again = ui_client.get("/login?next=" + quote(target, safe="/%:"))
    assert again.status_code == 302
    assert again.headers["Location"] == "/" and _same_site(again.headers["Location"])


def test_the_raw_tab_redirect_from_the_report(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    user = person(factory, org)
    client_sign_in(ui_client, user.email)
    resp = ui_client.get("/login?next=/%09/evil.example")
    assert resp.status_code == 302 and resp.headers["Location"] == "/"


@pytest.mark.parametrize("target", ["/orgs/acme/secrets", "/orgs/acme/secrets?cursor=abc%3D%3D", "/a/b%20c"])
def test_sign_in_keeps_same_site_paths(ui_client: FlaskClient, factory: Factory, org: str, target: str) -> None:
    user = person(factory, org)
    token = csrf_of(ui_client.get("/login").get_data(as_text=True))
    resp = ui_client.post(
        "/login", data={"email": user.email, "password": PASSWORD, "csrf_token": token, "next": target}
    )
    assert resp.status_code == 302 and resp.headers["Location"] == target and _same_site(target)


def test_home_goes_to_the_first_org_and_the_switcher_only_to_member_orgs(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    user = person(factory, org)
    other = factory.org()
    client_sign_in(ui_client, user.email)
    assert ui_client.get("/").headers["Location"] == f"/orgs/{org}/secrets"
    assert ui_client.get(f"/switch?org={other}").status_code == 404
    assert ui_client.get(f"/switch?org={org}").headers["Location"] == f"/orgs/{org}/secrets"


def test_the_ui_invitation_page_accepts_for_the_signed_in_address(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    admin = person(factory, org, "admin")
    invitee = person(factory, None)
    invitation = admin.post(f"orgs/{org}/members", json={"email": invitee.email, "role": "member"}).get_json()
    path = invitation["accept_path"]
    # Signed out: sign in first, then back here.
    first = ui_client.get(path)
    assert first.status_code == 302 and first.headers["Location"] == f"/login?next={path}"
    # Another address: nothing is shown.
    stranger = person(factory, None)
    other = ui_client.application.test_client()
    other_csrf = client_sign_in_any(other, stranger.email)
    assert other.get(path).status_code == 404
    assert other.post(path, data={"csrf_token": other_csrf}).status_code == 404
    token = client_sign_in_any(ui_client, invitee.email)
    page = ui_client.get(path)
    assert page.status_code == 200
    assert "Accept invitation" in page.get_data(as_text=True) and org.title() in page.get_data(as_text=True)
    assert ui_client.post(path).status_code == 400  # CSRF
    accepted = ui_client.post(path, data={"csrf_token": token})
    assert accepted.status_code == 302 and accepted.headers["Location"] == f"/orgs/{org}/secrets"
    with factory.db.session() as s:
        assert s.get(Membership, (identity.get_org(s, org).id, invitee.user_id)) is not None
    assert ui_client.get(path).status_code == 404  # used


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
    # Per-user OAuth servers: any member connects and disconnects themselves (the world's server
    # is not an OAuth one: 409; tests/e2e/ui covers a real connection).
    ("POST", "/orgs/<org>/mcp-servers/<server_id>/connect", "member"),
    ("POST", "/orgs/<org>/mcp-servers/<server_id>/disconnect", "member"),
    ("GET", "/orgs/<org>/connections", "member"),
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
