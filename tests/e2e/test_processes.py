"""The real processes: gunicorn serving ``app:create_app()`` in production mode, and ``latchkey dev``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.access import OrgAccess
from app.db import Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate, TokenCreate, UserCreate
from app.secrets.keyring import Keyring
from tests.support.factories import CTX
from tests.support.processes import BIN, free_port, http_request, wait_http, web_server


@pytest.fixture
def gunicorn(production_env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    with web_server(production_env, tmp_path / "gunicorn.log") as port:
        yield port


def test_gunicorn_serves_the_api_in_production_mode(gunicorn: int, db: Database) -> None:
    with db.session() as s:
        org = identity.create_org(s, CTX, OrgCreate(slug="prod"))
        user = identity.create_user(s, CTX, UserCreate(email="prod-admin@example.test"))
        identity.add_member(s, CTX, OrgAccess.system(org), user, "admin")
        _tok, token = identity.create_token(s, CTX, user, TokenCreate(name="t"))
    auth = {"Authorization": f"Bearer {token}"}

    assert http_request(gunicorn, "GET", "/readyz")[0] == 200
    status, headers, body = http_request(
        gunicorn, "POST", "/api/v1/orgs/prod/secrets", {"name": "PROD_KEY", "value": "prod-value"}, auth
    )
    assert status == 201, body
    assert json.loads(body)["version"] == 1
    assert headers["X-Request-ID"]
    status, _h, body = http_request(gunicorn, "GET", "/api/v1/orgs/prod/secrets", headers=auth)
    assert status == 200 and json.loads(body)["items"][0]["name"] == "PROD_KEY"


def test_gunicorn_refuses_oversized_headers_without_a_500(gunicorn: int) -> None:
    status, _h, _b = http_request(gunicorn, "GET", "/api/v1/me", headers={"X-Huge": "h" * 20_000})
    assert 400 <= status < 500
    status, _h, _b = http_request(gunicorn, "GET", "/api/v1/me", headers={"Authorization": "Bearer lk_" + "t" * 7000})
    assert status == 401


def test_production_web_refuses_to_start_without_keys(production_env: dict[str, str]) -> None:
    env = dict(production_env)
    del env["LATCHKEY_PUBLIC_KEYS"]
    proc = subprocess.run(
        [sys.executable, "-c", "from app import create_app; create_app()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "LATCHKEY_PUBLIC_KEYS is required" in proc.stderr


def test_latchkey_dev_runs_everything_and_prints_a_working_login(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    proc = subprocess.Popen(
        [str(BIN / "latchkey"), "dev", "--port", str(port), "--instance", str(tmp_path / "instance")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        printed: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line.strip().startswith("Token:") for line in printed):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            printed.append(line)
        token = next(line.split()[1] for line in printed if line.strip().startswith("Token:"))
        login = next(line for line in printed if line.strip().startswith("Login:"))
        assert "admin@demo.local" in login and "password:" in login
        wait_http(port, proc)
        auth = {"Authorization": f"Bearer {token}"}
        status, _h, body = http_request(port, "POST", "/api/v1/orgs/demo/secrets", {"name": "DEV", "value": "v"}, auth)
        assert status == 201, body
        status, _h, body = http_request(port, "GET", "/readyz")
        assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "broker": "ok"}
        # The demo admin is an instance operator too (the operator page can be tried).
        status, _h, body = http_request(port, "POST", "/api/v1/admin/jobs/ping", None, auth)
        assert status == 202, body
        status, _h, body = http_request(port, "GET", "/login")
        assert status == 200 and b"Sign in" in body
        keyring = tmp_path / "instance" / "dev-keyring.json"
        assert keyring.stat().st_mode & 0o777 == 0o600
        assert Keyring.load(keyring).has_dev_keys
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
    # A newcomer's first screen: no Celery superuser warning (the tests run as root in CI, and
    # the warning is for pickle, which a JSON-only worker never accepts: docs/operations.md),
    # and no terminal escape codes in log lines (the development server colours its banner).
    screen = "".join(printed) + rest
    assert "superuser privileges" not in screen and "SecurityWarning" not in screen
    assert "\x1b" not in screen
    assert "Running on" in screen  # the development server's banner was printed, and is clean
