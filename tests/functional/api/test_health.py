"""Liveness and readiness: no auth, 503 when a dependency is down, and no configuration leaks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.config import Settings
from app.factory import create_app
from tests.support import backends

# conftest's cleanup asks for `db` at teardown when `app` is used; request it up front.

CLOSED_BROKER = backends.closed_broker_url()
CLOSED_DATABASE = "postgresql+psycopg://latchkey_probe:pw-not-to-leak@127.0.0.1:1/latchkey_nowhere"


def _assert_no_configuration(body: str, settings: Settings) -> None:
    """No URL, host, port, path or credential of the configured services appears."""
    lowered = body.lower()
    services = ("redis", "amqp", "rabbit", "postgres", "sqlite")
    markers = (*services, "://", "127.0.0.1", "localhost", "password", "traceback")
    for marker in markers:
        assert marker not in lowered, marker
    for url in (settings.database_url, settings.redis_url, settings.effective_broker_url):
        parts = urlsplit(url)
        for fragment in (url, parts.netloc, parts.path.strip("/")):
            if fragment and len(fragment) > 2:
                assert fragment.lower() not in lowered, fragment
        if parts.port:
            assert str(parts.port) not in body


@pytest.fixture
def app_with(settings: Settings) -> Iterator[list[Flask]]:
    apps: list[Flask] = []
    yield apps
    for a in apps:
        a.extensions["latchkey.db"].dispose()


def _client(apps: list[Flask], settings: Settings) -> FlaskClient:
    application = create_app(settings)
    apps.append(application)
    return application.test_client()


def test_healthz_answers_without_auth(client: FlaskClient, settings: Settings) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}
    assert resp.headers["X-Request-ID"]
    _assert_no_configuration(resp.get_data(as_text=True), settings)


def test_readyz_is_ok_when_database_and_broker_are_reachable(client: FlaskClient, settings: Settings) -> None:
    resp = client.get("/readyz")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ok"
    assert body["checks"] == {"database": "ok", "broker": "ok"}
    _assert_no_configuration(resp.get_data(as_text=True), settings)


def test_readyz_is_503_when_the_broker_is_down_and_does_not_say_where(
    settings: Settings, app_with: list[Flask]
) -> None:
    broken = settings.model_copy(update={"broker_url": CLOSED_BROKER})
    client = _client(app_with, broken)

    started = time.monotonic()
    resp = client.get("/readyz")

    assert resp.status_code == 503
    assert time.monotonic() - started < 10
    body = resp.get_json()
    assert body["status"] != "ok"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"] != "ok"
    text = resp.get_data(as_text=True)
    _assert_no_configuration(text, broken)
    assert ":1" not in text and "6379" not in text


def test_readyz_is_503_when_the_database_is_down_and_does_not_say_where(
    settings: Settings, app_with: list[Flask]
) -> None:
    broken = settings.model_copy(update={"database_url": CLOSED_DATABASE})
    resp = _client(app_with, broken).get("/readyz")

    assert resp.status_code == 503
    body = resp.get_json()
    assert body["checks"]["database"] != "ok"
    assert body["checks"]["broker"] == "ok"
    text = resp.get_data(as_text=True)
    _assert_no_configuration(text, broken)
    assert "pw-not-to-leak" not in text and "latchkey_probe" not in text and "latchkey_nowhere" not in text


def test_health_endpoints_ignore_credentials_and_need_none(client: FlaskClient) -> None:
    for path in ("/healthz", "/readyz"):
        anonymous = client.get(path)
        bogus = client.get(path, headers={"Authorization": "Bearer lk_not-a-real-token"})
        assert anonymous.status_code == bogus.status_code == 200
