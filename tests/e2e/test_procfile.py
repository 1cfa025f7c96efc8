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

import pytest
import redis
from sqlalchemy import delete, select, update

from app.access import OrgAccess
from app.config import Settings, load_settings
from app.db import Database, utcnow
from app.factory import create_app
from app.identity import service as identity
from app.identity.schemas import OrgCreate, TokenCreate, UserCreate
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import CacheInvalidation, Job, McpServer, McpTool
from app.secrets import cachekeys, invalidation
from app.worker import beat_schedule, make_celery
from tests.support import backends, procfile
from tests.support.agents import PROVIDER_KEY
from tests.support.factories import CTX, Factory, drop_queued
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.processes import drop_queue_keys, free_port, http_request, settings_env, spawned_worker, wait_http
from tests.support.workers import wait_for

BIN = Path(sys.executable).parent
MCP_TOKEN = "mcp-procfile-token-" + "q" * 20
# What the worker's log says for each task it ran (Celery's own line, in our JSON format).
SUCCEEDED = re.compile(r"^Task (?P<name>[\w.]+)\[[0-9a-f-]+\] succeeded")


def runnable(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the venv's programs first on the PATH and the repository importable: the
    processes run in a scratch directory (beat writes its state file into its cwd)."""
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}", "PYTHONPATH": str(procfile.ROOT)}


def process_env(settings: Settings) -> dict[str, str]:
    """The environment of a Procfile process running with ``settings``."""
    return runnable(settings_env(settings))


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


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to every process of a Procfile command (its process group), as a process manager
    sends it: systemd to the unit's control group, Heroku to the dyno, honcho to the group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)


def exit_code(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The exit code; a process still running after ``timeout`` is killed (with its group) and fails the test."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        raise AssertionError(f"{proc.args!r} did not exit within {timeout} s of its signal") from None


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    terminate(proc)
    return exit_code(proc, timeout)


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


@pytest.mark.slow
@pytest.mark.skipif(
    backends.forced_sqlite(),
    reason="the Procfile deploys on PostgreSQL: beat beside a worker runs in the PostgreSQL + Redis lane",
)
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
                    s.execute(delete(McpTool).where(McpTool.mcp_server_id == server_id))
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
                        code = stop(beat, timeout=90)  # a loaded CI machine
            beat_text = (tmp_path / "beat.log").read_text()
        finally:
            client.delete(pointer_key)
            client.close()
            web.extensions["latchkey.db"].dispose()
    assert code == 0, beat_text
    assert schedule <= tasks_run(worker_log)
    for task in schedule:
        assert f"({task})" in beat_text  # "Scheduler: Sending due task <entry> (<task>)"


# The whole Procfile (issue #14 item 3) -------------------------------------------------------


@contextmanager
def fresh_database(tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's own (PostgreSQL when reachable, else a SQLite file)."""
    name = f"latchkey_procfile_{backends.worker_suffix()}_{uuid.uuid4().hex[:10]}"
    pg = backends.fresh_postgres_database(name)
    try:
        yield pg or f"sqlite:///{tmp_path / 'procfile.db'}"
    finally:
        if pg:
            backends.drop_postgres_database(name)


class Api:
    """The deployment's API as a client sees it, over HTTP with a bearer token."""

    def __init__(self, port: int, token: str, org: str) -> None:
        self.port, self.auth, self.org = port, {"Authorization": f"Bearer {token}"}, org

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, headers, raw = http_request(self.port, method, f"/api/v1/orgs/{self.org}/{path}", body, self.auth)
        assert status == expect, (method, path, status, raw[:500])
        return json.loads(raw) if raw else None, headers

    def get(self, path: str) -> Any:
        return self.call("GET", path)[0]

    def post(self, path: str, body: Any = None, expect: int = 201) -> Any:
        return self.call("POST", path, body, expect)[0]


def _seed_admin(database_url: str) -> str:
    """The first admin of org ``acme`` and their API token (what an operator does with the CLI)."""
    db = Database()
    db.configure(database_url)
    try:
        with db.session() as s:
            org = identity.create_org(s, CTX, OrgCreate(slug="acme"))
            user = identity.create_user(s, CTX, UserCreate(email="ops@acme.test"))
            identity.add_member(s, CTX, OrgAccess.system(org), user, "admin")
            _tok, token = identity.create_token(s, CTX, user, TokenCreate(name="smoke"))
        return token
    finally:
        db.dispose()


def _job_states(database_url: str) -> dict[str, tuple[str, str]]:
    db = Database()
    db.configure(database_url)
    try:
        with db.session() as s:
            return {j.id: (j.kind, j.status) for j in s.scalars(select(Job))}
    finally:
        db.dispose()


@pytest.mark.slow
@pytest.mark.skipif(
    backends.forced_sqlite(),
    reason="the Procfile deploys on PostgreSQL: the smoke test runs in the PostgreSQL + Redis lane",
)
def test_the_procfile_as_written_serves_a_deployment_and_every_process_stops_cleanly_on_sigterm(
    production_env: dict[str, str], redis_url: str, llm: LlmTestServer, tmp_path: Path
) -> None:
    entries = procfile.read()
    assert set(entries) == {"release", "web", "worker", "beat"}
    port = free_port()
    queue = f"latchkey-smoke-{uuid.uuid4().hex[:10]}"
    with fresh_database(tmp_path) as database_url, McpTestServer(token=MCP_TOKEN) as mcp:
        env = {
            **production_env,
            "LATCHKEY_DATABASE_URL": database_url,
            "LATCHKEY_QUEUE": queue,
            # The MCP server and the model stand-in are on loopback, over plain http.
            "LATCHKEY_EGRESS_ALLOW_PRIVATE": "true",
            "LATCHKEY_EGRESS_ALLOW_HTTP_HOSTS": "127.0.0.1",
            "PORT": str(port),  # and WEB_CONCURRENCY unset: the Procfile's default (2) applies
        }
        env.pop("WEB_CONCURRENCY", None)
        env = runnable(env)
        # Release: migrates the empty database, and running it again (every deploy does) is a no-op.
        for _ in range(2):
            release = procfile.run(entries["release"], env, tmp_path)
            assert release.returncode == 0, release.stdout
        logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("web", "worker", "beat")}
        procs = {name: procfile.start(entries[name], env, tmp_path, logs[name]) for name in logs}
        codes: dict[str, int] = {}
        try:
            wait_http(port, procs["web"], timeout=120)  # two web processes booting on a loaded CI machine
            producer = make_celery(load_settings({k: v for k, v in env.items() if k.startswith("LATCHKEY_")}))
            try:
                wait_for(lambda: producer.control.ping(timeout=0.5), timeout=120)
            finally:
                producer.close()
            api = Api(port, _seed_admin(database_url), "acme")

            secret = api.post("secrets", {"name": "DEPLOY_KEY", "value": "deploy-value-" + "d" * 20})
            assert secret["version"] == 1
            # An MCP server with its token in a secret, validated by the worker.
            mcp_secret = api.post("secrets", {"name": "MCP_TOKEN", "value": MCP_TOKEN})["id"]
            server = api.post("mcp-servers", {"name": "Tools", "url": mcp.url, "secret_ref": mcp_secret})
            settled = wait_for(
                lambda: (got := api.get(f"mcp-servers/{server['id']}"))["status"] in ("valid", "invalid") and got,
                timeout=30,
            )
            assert (settled["status"], settled["tool_count"]) == ("valid", 4), settled
            # Reveal: the worker opens the value and seals it to the request's one-request key.
            revealed, headers = api.call("POST", f"secrets/{secret['id']}/reveal")
            assert revealed == {"value": "deploy-value-" + "d" * 20, "version": 1}
            assert "no-store" in headers["Cache-Control"]
            # An agent run: the model (stand-in) asks for the MCP tool, the worker calls it.
            key = api.post("secrets", {"name": "MODEL_KEY", "value": PROVIDER_KEY})["id"]
            provider = api.post(
                "providers",
                {
                    "name": "Model",
                    "provider_type": "openai_compatible",
                    "kind": "openai",
                    "model_id": "test-model",
                    "config": {"base_url": llm.url + "/v1"},
                    "secret_ref": key,
                },
            )["id"]
            tools = [{"mcp_server_id": server["id"], "tool_name": "add"}]
            agent = api.post("agents", {"name": "Bot", "provider_id": provider, "tools": tools})["id"]
            llm.script([{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, {"text": "5"}])
            run = api.post(f"agents/{agent}/runs", {"input": "2+3?"}, expect=202)["run"]
            done = wait_for(lambda: (r := api.get(f"runs/{run['id']}"))["status"] in ("succeeded", "failed") and r)
            assert done["status"] == "succeeded", done
            assert [e["type"] for e in done["events"]] == ["status", "tool_call", "tool_result", "final"]

            # A run in flight (its model call takes a while) when the deployment is stopped.
            seen = len(llm.requests)
            llm.script([{"delay_seconds": 4, "text": "finished during the warm shutdown"}])
            late = api.post(f"agents/{agent}/runs", {"input": "slow"}, expect=202)["run"]
            wait_for(lambda: len(llm.requests) > seen, timeout=20)
            assert api.get(f"runs/{late['id']}")["status"] == "running"
            for proc in procs.values():
                terminate(proc)
            codes = {name: exit_code(proc) for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            for log in logs.values():
                log.close()
            drop_queue_keys(redis_url, queue)
        output = {name: (tmp_path / f"{name}.log").read_text(errors="replace") for name in logs}
        assert codes == {"web": 0, "worker": 0, "beat": 0}, {n: output[n][-2000:] for n in output}
        assert output["web"].count("Booting worker") == 2  # ${WEB_CONCURRENCY:-2}
        assert not [name for name, text in output.items() if "\x1b" in text]  # no terminal escapes
        assert "Warm shutdown" in output["worker"]
        assert "WorkerLostError" not in output["worker"] and "exited with 'signal" not in output["worker"]
        # The run in flight was finished by the warm shutdown, and no job was lost or left behind.
        states = _job_states(database_url)
    assert states and all(status == "succeeded" for _kind, status in states.values()), states
    assert {kind for kind, _status in states.values()} == {
        "mcp.validate_server",
        "secrets.reveal_value",
        "agents.run_agent",
    }


@pytest.mark.slow
def test_a_cold_shutdown_still_ends_the_running_task_of_a_prefork_child(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    """A pool child ignores a SIGTERM from outside (above), not its worker's: SIGQUIT still stops it mid-task."""
    with own_queue(settings) as custom:
        command = procfile.argv(procfile.read()["worker"], process_env(custom))
        key = f"lk-test-cold:{uuid.uuid4().hex}"
        job_id = _job(db)
        with db.session() as s:  # a job that would run for five minutes
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(kind="tests.lease_probe", params={"key": key, "first_seconds": 300})
            )
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [*command, "--include", "tests.support.lease_tasks"],
                env=process_env(custom),
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            producer = make_celery(custom)
            client = redis.Redis.from_url(redis_url)
            try:
                wait_for(lambda: producer.control.ping(timeout=0.5), timeout=120)
                jobs.Publisher(producer, db).send(job_id, "tests.lease_probe")
                wait_for(lambda: client.llen(key) == 1, timeout=30)  # inside the body
                worker.send_signal(signal.SIGQUIT)
                code = exit_code(worker, timeout=60)
                events = [json.loads(raw)["event"] for raw in client.lrange(key, 0, -1)]
            finally:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(5)
                client.delete(key, f"{key}:inside")
                client.close()
                producer.close()
    assert code == 0
    assert events == ["enter"]  # terminated inside the body, well before its five minutes
    row = _row(db, Job, job_id)
    assert (row.status, row.attempts) == ("running", 1)  # the lease sweep takes it from here
