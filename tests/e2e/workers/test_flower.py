"""Operators can watch the workers with Flower: ``celery -A app.worker flower``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from celery import Celery

from app.config import Settings
from tests.support.processes import settings_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flower_runs_against_the_app_and_sees_the_worker(worker: Celery, settings: Settings) -> None:
    port = _free_port()
    env = settings_env(settings) | {"FLOWER_UNAUTHENTICATED_API": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "app.worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        workers: dict[str, Any] = {}
        while time.monotonic() < deadline and not workers:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=10) as r:
                    workers = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert any(name.startswith("test-") for name in workers), workers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # flower's own shutdown is not what this test checks
            proc.kill()
            proc.wait(5)
    assert os.environ.get("FLOWER_UNAUTHENTICATED_API") is None  # the test's setting stayed in the child
