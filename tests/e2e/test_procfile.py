"""The Procfile as deployed (issue #14): its commands run exactly as written, beat beside a worker, then all four.

Each command is read from the repository's Procfile (tests/support/procfile.py) and started
with a LATCHKEY_* environment of the test's own: its own queue, and for the smoke test its own
database, keyring and port. Nothing here sends a beat task itself: what the worker runs, beat sent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select, update

from app.config import Settings
from app.db import Database, utcnow
from app.factory import create_app
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import CacheInvalidation, Job, McpServer, McpTool
from app.secrets import cachekeys, invalidation
from app.worker import beat_schedule
from tests.support import procfile
from tests.support.factories import CTX, Factory, drop_queued
from tests.support.mcp_server import McpTestServer
from tests.support.processes import drop_queue_keys, settings_env, spawned_worker
from tests.support.workers import wait_for

BIN = Path(sys.executable).parent
MCP_TOKEN = "mcp-procfile-token-" + "q" * 20
# What the worker's log says for each task it ran (Celery's own line, in our JSON format).
SUCCEEDED = re.compile(r"^Task (?P<name>[\w.]+)\[[0-9a-f-]+\] succeeded")


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a Procfile process of ``settings`` gets: the LATCHKEY_* settings, the venv's
    programs first on the PATH, and the repository importable (the processes run in a scratch cwd)."""
    env = settings_env(settings)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["PYTHONPATH"] = str(procfile.ROOT)
    env.update(extra)
    return env


def tasks_run(log_path: Path) -> set[str]:
    """The names of the tasks a worker's JSON log says it finished successfully."""
    names = set()
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            message = json.loads(line).get("message", "")
        except (ValueError, AttributeError):
            continue
        match = SUCCEEDED.match(message) if isinstance(message, str) else None
        if match:
            names.add(match.group("name"))
    return names


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, as a process manager sends it; the exit code (killed after ``timeout``: an error)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise AssertionError(f"{proc.args[:3]} did not exit within {timeout} s of SIGTERM") from None


@contextmanager
def own_queue(settings: Settings, **overrides: Any) -> Iterator[Settings]:
    """``settings`` on a queue of the test's own (no session worker consumes it)."""
    custom = settings.model_copy(update={"queue": f"latchkey-procfile-{uuid.uuid4().hex[:10]}", **overrides})
    try:
        yield custom
    finally:
        drop_queue_keys(settings.redis_url, custom.queue)


# Beat beside a worker (issue #14 item 2) ------------------------------------------------------


def _job(db: Database, **values: Any) -> str:
    """A ping job whose message never went out, with ``values`` written to its row."""
    with db.session() as s:
        job_id = jobs.create_job(s, CTX, org_id=None, kind=TaskName.PING).id
        drop_queued(s)
    if values:
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(**values))
    return job_id


def _row(db: Database, model: Any, row_id: str) -> Any:
    with db.session() as s:
        return s.get(model, row_id)


def test_beat_from_the_procfile_runs_every_scheduled_task_on_a_real_worker(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    """Every entry of the schedule is sent by the real beat process and run by a real worker, with its effect."""
    every = 1.0
    with (
        own_queue(
            settings,
            job_requeue_seconds=every,
            job_sweep_seconds=every,
            invalidation_replay_seconds=every,
            mcp_refresh_seconds=every,
        ) as custom,
        McpTestServer(token=MCP_TOKEN) as mcp,
    ):
        schedule = {spec["task"] for spec in beat_schedule(custom).values()}
        web = create_app(custom)
        client = redis.Redis.from_url(redis_url)
        worker_log = tmp_path / "worker.log"
        try:
            f = Factory(web.extensions["latchkey.db"], web.test_client())
            org = f.org()
            admin = f.user(org, "admin")
            with spawned_worker(custom, worker_log, concurrency=2):
                # mcp.refresh_tools: a valid server whose stored tool list went stale.
                secret = f.secret(admin, org, value=MCP_TOKEN)["id"]
                server_id = admin.post(
                    f"orgs/{org}/mcp-servers", json={"name": "Tools", "url": mcp.url, "secret_ref": secret}
                ).get_json()["id"]
                wait_for(lambda: _row(db, McpServer, server_id).status == "valid")
                with db.session() as s:
                    server = s.get(McpServer, server_id)
                    assert server is not None
                    s.execute(McpTool.__table__.delete().where(McpTool.mcp_server_id == server_id))
                    s.add(McpTool(org_id=server.org_id, mcp_server_id=server_id, name="retired", input_schema={}))
                    validated_at = server.validated_at
                # secrets.replay_invalidations: an outbox row Redis never took.
                org_id = server.org_id
                with db.session() as s:
                    invalidation.stage(s, org_id, secret, cachekeys.pointer(7, 7))
                    outbox = s.scalars(select(CacheInvalidation.id)).one()
                    drop_queued(s, "invalidate")
                pointer_key = cachekeys.key(org_id, secret)
                # jobs.requeue_stuck: a job whose message was lost, queued for three minutes.
                stuck = _job(db, updated_at=utcnow() - timedelta(minutes=3))
                # jobs.sweep_leases: a job whose worker died holding it (lease lapsed).
                lapsed = _job(db)
                with db.session() as s:
                    assert jobs.claim(s, lapsed, "dead-node:1:abc", 30, max_attempts=5) is not None
                    past = utcnow() - timedelta(seconds=1)
                    s.execute(update(Job).where(Job.id == lapsed).values(lease_expires_at=past))

                def tools() -> set[str]:
                    with db.session() as s:
                        return set(s.scalars(select(McpTool.name).where(McpTool.mcp_server_id == server_id)))

                def pointer() -> bytes | None:
                    raw = client.get(pointer_key)
                    return raw if raw is None or isinstance(raw, bytes) else None

                effects: dict[str, Callable[[], bool]] = {
                    TaskName.REQUEUE_STUCK: lambda: (
                        (_row(db, Job, stuck).status, _row(db, Job, stuck).attempts) == ("succeeded", 1)
                    ),
                    TaskName.SWEEP_LEASES: lambda: (
                        (_row(db, Job, lapsed).status, _row(db, Job, lapsed).attempts) == ("succeeded", 2)
                    ),
                    TaskName.REPLAY_INVALIDATIONS: lambda: (
                        _row(db, CacheInvalidation, outbox) is None and pointer() == b"7:7\n"
                    ),
                    TaskName.REFRESH_TOOLS: lambda: (
                        tools() == {"add", "echo", "whoami", "slow"}
                        and _row(db, McpServer, server_id).validated_at > validated_at
                    ),
                }
                # A schedule entry without an effect checked here fails the test.
                assert set(effects) == schedule
                assert not any(check() for check in effects.values())  # nothing happened before beat

                with (tmp_path / "beat.log").open("wb") as beat_log:
                    beat = procfile.start(procfile.read()["beat"], process_env(custom), tmp_path, beat_log)
                    try:
                        for task, check in effects.items():
                            try:
                                wait_for(check, timeout=30, interval=0.2)
                            except AssertionError:
                                raise AssertionError(f"no effect of {task} seen") from None
                        wait_for(lambda: schedule <= tasks_run(worker_log), timeout=10)
                    finally:
                        code = stop(beat)
            beat_text = (tmp_path / "beat.log").read_text()
        finally:
            client.delete(pointer_key)
            client.close()
            web.extensions["latchkey.db"].dispose()
    assert code == 0, beat_text
    assert schedule <= tasks_run(worker_log)
    for task in schedule:
        assert f"({task})" in beat_text  # "Scheduler: Sending due task <entry> (<task>)"
