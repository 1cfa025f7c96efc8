"""The real processes: gunicorn serving ``app:create_app()`` in production mode, and ``latchkey dev``."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.access import OrgAccess
from app.config import Settings
from app.db import Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate, TokenCreate, UserCreate
from app.secrets.keyring import Keyring
from tests.support.factories import CTX

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = json.dumps(body) if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), raw


def _wait_http(port: int, proc: subprocess.Popen[Any], timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        try:
            if _request(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


@pytest.fixture
def production_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    ring = Keyring.generate()
    ring.write(tmp_path / "ring.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    env.update(
        LATCHKEY_ENV="production",
        LATCHKEY_DATABASE_URL=settings.database_url,
        LATCHKEY_REDIS_URL=settings.redis_url,
        LATCHKEY_SECRET_KEY="p" * 48,
        LATCHKEY_PUBLIC_KEYS=ring.public_set().dumps(),
    )
    if settings.broker_url:  # this run's broker (RabbitMQ with --broker rabbitmq)
        env["LATCHKEY_BROKER_URL"] = settings.broker_url
    return env


@pytest.fixture
def gunicorn(production_env: dict[str, str]) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "2", "app:create_app()"],
        env=production_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


def test_gunicorn_serves_the_api_in_production_mode(gunicorn: int, db: Database) -> None:
    with db.session() as s:
        org = identity.create_org(s, CTX, OrgCreate(slug="prod"))
        user = identity.create_user(s, CTX, UserCreate(email="prod-admin@example.test"))
        identity.add_member(s, CTX, OrgAccess.system(org), user, "admin")
        _tok, token = identity.create_token(s, CTX, user, TokenCreate(name="t"))
    auth = {"Authorization": f"Bearer {token}"}

    assert _request(gunicorn, "GET", "/readyz")[0] == 200
    status, headers, body = _request(
        gunicorn, "POST", "/api/v1/orgs/prod/secrets", {"name": "PROD_KEY", "value": "prod-value"}, auth
    )
    assert status == 201, body
    assert json.loads(body)["version"] == 1
    assert headers["X-Request-ID"]
    status, _h, body = _request(gunicorn, "GET", "/api/v1/orgs/prod/secrets", headers=auth)
    assert status == 200 and json.loads(body)["items"][0]["name"] == "PROD_KEY"


def test_gunicorn_refuses_oversized_headers_without_a_500(gunicorn: int) -> None:
    status, _h, _b = _request(gunicorn, "GET", "/api/v1/me", headers={"X-Huge": "h" * 20_000})
    assert 400 <= status < 500
    status, _h, _b = _request(gunicorn, "GET", "/api/v1/me", headers={"Authorization": "Bearer lk_" + "t" * 7000})
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
    port = _free_port()
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
        _wait_http(port, proc)
        auth = {"Authorization": f"Bearer {token}"}
        status, _h, body = _request(port, "POST", "/api/v1/orgs/demo/secrets", {"name": "DEV", "value": "v"}, auth)
        assert status == 201, body
        status, _h, body = _request(port, "GET", "/readyz")
        assert status == 200 and json.loads(body)["checks"] == {"database": "ok", "broker": "ok"}
        # The demo admin is an instance operator too (the operator page can be tried).
        status, _h, body = _request(port, "POST", "/api/v1/admin/jobs/ping", None, auth)
        assert status == 202, body
        status, _h, body = _request(port, "GET", "/login")
        assert status == 200 and b"Sign in" in body
        keyring = tmp_path / "instance" / "dev-keyring.json"
        assert keyring.stat().st_mode & 0o777 == 0o600
        assert Keyring.load(keyring).has_dev_keys
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
