"""The backfill: legacy rows (revision 0001) into sealed secrets, MCP secret refs and providers."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select

from app.backfill.service import run_backfill, slugify
from app.cli import main
from app.config import Settings
from app.db import Database
from app.factory import create_app
from app.models import AuditEvent, Job, Provider, Secret
from app.secrets.keyring import Keyring
from tests.support.factories import Factory
from tests.support.legacy_data import (
    AGENTS,
    BAD_AGENTS,
    CTX,
    EXPECTED_PROVIDERS,
    LEGACY_SECRETS,
    MCP,
    ORG_B,
    TOKEN_OTHER,
    TOKEN_SHARED,
    _id,
    assert_complete,
    counts,
    snapshot,
)
from tests.support.processes import settings_env, spawned_worker
from tests.support.workers import extra_worker, wait_for, wait_job


def test_backfill_dry_run_run_and_rerun(legacy_db: Database, keyring: Keyring) -> None:
    keys = keyring.public_set()
    before = snapshot(legacy_db)
    audit_before = counts(legacy_db)[2]

    dry = run_backfill(legacy_db, keys, CTX, dry_run=True, batch_size=2)
    assert snapshot(legacy_db) == before and counts(legacy_db)[2] == audit_before
    assert dry.secrets.migrated == len(LEGACY_SECRETS)
    assert dry.mcp_servers.migrated == len(MCP)
    assert dry.agents.migrated == len(AGENTS) and dry.agents.failed == len(BAD_AGENTS)
    assert dry.secrets_created == 4  # A: shared + other token; B; C
    assert dry.providers_created == EXPECTED_PROVIDERS

    seen: list[tuple[int, int]] = []
    summary = run_backfill(legacy_db, keys, CTX, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert_complete(legacy_db, keyring)
    result = summary.as_dict()
    assert result["secrets"]["migrated"] == len(LEGACY_SECRETS) and result["secrets"]["skipped"] == 0
    assert result["mcp_servers"]["migrated"] == len(MCP)
    assert result["agents"]["migrated"] == len(AGENTS)
    reasons = {f["id"]: f["reason"].split(":")[0] for f in result["agents"]["failures"]}
    assert reasons == {aid: bad[3] for aid, bad in BAD_AGENTS.items()}
    assert result["created"] == {"secrets": 4, "providers": EXPECTED_PROVIDERS}
    assert seen[0] == (0, summary.total) and seen[-1] == (summary.done, summary.total) and len(seen) > 3
    # No value anywhere in the summary or the audit log.
    with legacy_db.session() as s:
        details = json.dumps([e.details for e in s.scalars(select(AuditEvent))], ensure_ascii=False)
    for text in (json.dumps(result, ensure_ascii=False), details):
        for value in [v for _o, v in LEGACY_SECRETS.values()] + [TOKEN_SHARED, TOKEN_OTHER, "tok-c"]:
            if len(value) > 3:
                assert value not in text

    # A second run changes nothing.
    after = snapshot(legacy_db)
    again = run_backfill(legacy_db, keys, CTX, batch_size=3)
    assert snapshot(legacy_db) == after
    assert again.secrets.migrated == again.mcp_servers.migrated == again.agents.migrated == 0
    assert again.secrets.skipped == len(LEGACY_SECRETS) and again.mcp_servers.skipped == len(MCP)
    assert again.agents.skipped == len(AGENTS) and again.agents.failed == len(BAD_AGENTS)


def test_backfill_one_org(legacy_db: Database, keyring: Keyring) -> None:
    summary = run_backfill(legacy_db, keyring.public_set(), CTX, batch_size=50, org_slug="bravo")
    assert summary.secrets.migrated == 1 and summary.mcp_servers.migrated == 1 and summary.agents.migrated == 1
    with legacy_db.session() as s:
        assert {x.org_id for x in s.scalars(select(Secret).where(Secret.ciphertext.is_not(None)))} == {ORG_B}
        assert {p.org_id for p in s.scalars(select(Provider))} == {ORG_B}


@pytest.mark.parametrize("stop_after", [1, 3, 5, 8])
def test_interrupted_backfill_resumes_without_duplicates(
    legacy_db: Database, keyring: Keyring, stop_after: int
) -> None:
    keys = keyring.public_set()
    calls = {"n": 0}

    def crash(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] > stop_after:  # the first call is the start, before any batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_backfill(legacy_db, keys, CTX, batch_size=2, progress=crash)
    run_backfill(legacy_db, keys, CTX, batch_size=2)
    assert_complete(legacy_db, keyring)
    secrets, providers, _ = counts(legacy_db)
    assert providers == EXPECTED_PROVIDERS
    assert len(LEGACY_SECRETS) + 4 <= secrets <= len(LEGACY_SECRETS) + len(MCP)
    # And once complete, a third run changes nothing.
    after = snapshot(legacy_db)
    run_backfill(legacy_db, keys, CTX, batch_size=2)
    assert snapshot(legacy_db) == after


def test_slugify() -> None:
    assert slugify("Docs Server ü") == "docs_server_u"
    assert slugify("日本語") == "server"
    assert slugify("--A--b--") == "a_b"


def _cli_env(settings: Settings, url: str, **drop: bool) -> dict[str, str]:
    env = settings_env(settings.model_copy(update={"database_url": url}))
    for key in drop:
        env.pop(key, None)
    return env


def test_cli_backfill_run_and_status(settings: Settings, legacy_url: str, keyring: Keyring) -> None:
    runner = CliRunner()
    no_keys = runner.invoke(main, ["backfill", "run"], env=_cli_env(settings, legacy_url, LATCHKEY_PUBLIC_KEYS=True))
    assert no_keys.exit_code != 0 and "LATCHKEY_PUBLIC_KEYS" in no_keys.stderr
    assert len(no_keys.stderr.strip().splitlines()) == 1

    env = _cli_env(settings, legacy_url)
    none_yet = runner.invoke(main, ["backfill", "status"], env=env)
    assert none_yet.exit_code == 1

    dry = runner.invoke(main, ["backfill", "run", "--dry-run", "--batch-size", "3"], env=env)
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True

    unknown = runner.invoke(main, ["backfill", "run", "--org", "nope"], env=env)
    assert unknown.exit_code == 1 and "nope" in unknown.stderr

    run = runner.invoke(main, ["backfill", "run", "--batch-size", "3"], env=env)
    assert run.exit_code == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["secrets"]["migrated"] == len(LEGACY_SECRETS)
    assert summary["agents"]["failed"] == len(BAD_AGENTS)
    assert "not migrated" in run.stderr

    database = Database()
    database.configure(legacy_url)
    try:
        assert_complete(database, keyring)
    finally:
        database.dispose()

    status = runner.invoke(main, ["backfill", "status"], env=env)
    assert status.exit_code == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["legacy_columns"] is True and shown["verification"] is None
    assert shown["remaining"] == {"secrets": 0, "mcp_servers": 0, "agents": len(BAD_AGENTS)}
    job = shown["run"]
    assert job["status"] == "succeeded" and job["result"] == summary
    assert job["progress"]["done"] == job["progress"]["total"] > 0


def test_operator_route_runs_backfill_on_a_worker(settings: Settings, legacy_url: str, keyring: Keyring) -> None:
    with extra_worker(settings, database_url=legacy_url) as (_producer, web):
        db = web.extensions["latchkey.db"]
        factory = Factory(db, web.test_client())
        admin = factory.user("acme", "admin")
        assert admin.post("admin/backfill").status_code == 403
        op = factory.user(operator=True)
        assert op.post("admin/backfill", json={"batch_size": 0}).status_code == 422
        before = snapshot(db)

        dry = op.post("admin/backfill", json={"dry_run": True})
        assert dry.status_code == 202, dry.get_json()
        done = wait_job(op.get, f"admin/jobs/{dry.get_json()['job']['id']}")
        assert done["status"] == "succeeded" and done["result"]["agents"]["migrated"] == len(AGENTS)
        assert snapshot(db) == before

        resp = op.post("admin/backfill")  # an empty POST works
        assert resp.status_code == 202, resp.get_json()
        done = wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}")
        assert done["status"] == "succeeded", done
        assert done["result"]["secrets"]["migrated"] == len(LEGACY_SECRETS)
        assert done["result"]["created"]["providers"] == EXPECTED_PROVIDERS
        total = len(LEGACY_SECRETS) + len(MCP) + len(AGENTS) + len(BAD_AGENTS)
        assert done["progress"]["done"] == done["progress"]["total"] == total
        assert_complete(db, keyring)
        status = op.get("admin/backfill").get_json()
        assert status["latest_run"]["id"] == done["id"] and status["legacy_columns"] is True
        assert status["remaining"] == {"secrets": 0, "mcp_servers": 0, "agents": len(BAD_AGENTS)}


def test_a_backfill_worker_killed_mid_run_then_rerun_completes_without_duplicates(
    settings: Settings, legacy_url: str, keyring: Keyring, tmp_path: Path
) -> None:
    """kill -9 the worker process in the middle of the backfill job; a rerun finishes the job."""
    extra = {_id("d1000000", n): f"extra-token-{n:04d}-{'x' * 16}" for n in range(300)}
    engine = sa.create_engine(legacy_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :o, :n, :u, :t)"),
                [
                    {"id": i, "o": ORG_B, "n": f"extra {i[-4:]}", "u": "https://x.test", "t": t}
                    for i, t in extra.items()
                ],
            )
    finally:
        engine.dispose()
    custom = settings.model_copy(update={"queue": f"latchkey-kill-{uuid.uuid4().hex[:10]}", "database_url": legacy_url})
    web = create_app(custom)
    db = web.extensions["latchkey.db"]
    op = Factory(db, web.test_client()).user(operator=True)
    try:
        with spawned_worker(custom, tmp_path / "w1.log", concurrency=1) as (proc, _producer):
            job_id = op.post("admin/backfill", json={"batch_size": 1}).get_json()["job"]["id"]

            def progressing() -> bool:
                with db.session() as s:
                    job = s.get(Job, job_id)
                    return job is not None and (job.progress_done or 0) > len(LEGACY_SECRETS) + 3

            wait_for(progressing, 30, interval=0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status == "running"
            assert 0 < job.progress_done < (job.progress_total or 0), "the backfill finished too fast"
        with spawned_worker(custom, tmp_path / "w2.log", concurrency=1):
            rerun = op.post("admin/backfill", json={"batch_size": 50}).get_json()["job"]["id"]
            done = wait_job(op.get, f"admin/jobs/{rerun}", timeout=60)
        assert done["status"] == "succeeded", done
        assert 0 < done["result"]["mcp_servers"]["migrated"] < len(MCP) + len(extra)
        assert done["result"]["mcp_servers"]["skipped"] > 0
        assert_complete(db, keyring, extra_servers=extra)
    finally:
        db.dispose()
