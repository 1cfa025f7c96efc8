"""The worker entry in real processes: ``app.tasks`` imports without side effects, the web factory
reads only the settings it is given, and the deprecated ``celery -A app.tasks`` still works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from app.config import Settings
from tests.support.processes import settings_env

ROOT = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).with_name("celery")

# Every LATCHKEY_* value wrong: whatever reads the environment fails (or tries a dead address).
BROKEN_ENV = {
    "LATCHKEY_ENV": "production",
    "LATCHKEY_DATABASE_URL": "postgresql+psycopg://nobody@192.0.2.1:1/none",
    "LATCHKEY_REDIS_URL": "redis://192.0.2.1:1/0",
    "LATCHKEY_BROKER_URL": "redis://192.0.2.1:1/1",
    "LATCHKEY_PUBLIC_KEYS": "not a key set",
    "LATCHKEY_SECRET_KEY": "short",
}

# Runs in the child: refuse every outgoing connection, import, and report what exists.
PROBE = """
import importlib, json, pkgutil, socket, sys

attempts = []

def refuse(self, address, *args, **kwargs):
    attempts.append(repr(address))
    raise OSError("connections are not allowed while importing")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse

import app.tasks
modules = ["app.tasks"] + [f"app.tasks.{m.name}" for m in pkgutil.iter_modules(app.tasks.__path__)]
for name in modules:
    importlib.import_module(name)
import app.worker

from celery import _state
print(json.dumps({
    "modules": modules,
    "apps": len(list(_state._apps)),
    "default_app": _state.default_app is not None,
    "connections": attempts,
}))
"""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}


def test_importing_the_tasks_builds_no_app_and_opens_no_connection() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=_clean_env() | BROKEN_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "app.tasks.agents" in report["modules"] and "app.tasks.mcp" in report["modules"]
    assert report["apps"] == 0
    assert report["default_app"] is False
    assert report["connections"] == []


def test_the_web_factory_uses_the_settings_it_is_given_not_the_environment(settings: Settings) -> None:
    given = settings_env(settings)
    script = (
        "import json, os\n"
        "from app.config import load_settings\n"
        "from app.factory import create_app\n"
        "settings = load_settings(json.loads(os.environ.pop('GIVEN')))\n"
        "app = create_app(settings)\n"
        "celery = app.extensions['latchkey.publisher'].celery\n"
        "print(json.dumps([celery.conf.broker_url, celery.conf.task_default_queue]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=_clean_env() | BROKEN_ENV | {"GIVEN": json.dumps(given)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [settings.effective_broker_url, settings.queue]


def test_the_old_entry_still_works_and_warns_once(settings: Settings) -> None:
    runs = {}
    for entry in ("app.tasks", "app.worker"):
        # `celery report` prints the app's configuration without touching the broker.
        runs[entry] = subprocess.run(
            [str(CELERY), "-A", entry, "report"],
            cwd=ROOT,
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    old, new = runs["app.tasks"], runs["app.worker"]
    assert old.returncode == new.returncode == 0, old.stderr + new.stderr
    # Both are the app built from this environment's settings.
    assert f"task_default_queue: {settings.queue!r}" in old.stdout
    assert f"task_default_queue: {settings.queue!r}" in new.stdout
    assert old.stderr.count("`celery -A app.tasks` is deprecated") == 1, old.stderr
    assert "deprecated" not in new.stderr
