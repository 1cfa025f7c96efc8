"""Verify and contract: prove the backfill on a worker, then drop the legacy columns.

Built from a database at revision 0001 filled with legacy rows (tests/support/legacy_data.py),
expanded to the last revision before the contract, with a real worker process on it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select, update

from app import migrate
from app.backfill import legacy
from app.backfill.service import run_backfill
from app.cli import main
from app.config import Settings
from app.db import Database
from app.models import BackfillVerification, Provider, Secret
from app.secrets.keyring import Keyring
from app.secrets.sealing import seal, secret_context
from tests.support.factories import Caller, Factory
from tests.support.legacy_data import (
    AGENTS,
    BAD_AGENTS,
    CTX,
    LEGACY_SECRETS,
    MCP,
    ORG_A,
    SA2,
    TOKEN_OTHER,
    TOKEN_SHARED,
    _id,
)
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.processes import settings_env
from tests.support.workers import extra_worker, wait_for, wait_job

VALUES = [v for _org, v in LEGACY_SECRETS.values() if len(v) > 3] + [TOKEN_SHARED, TOKEN_OTHER]


@pytest.fixture
def ring(tmp_path: Path, keyring_path: Path) -> Path:
    """A keyring file of this test's own (the test rotates it)."""
    path = tmp_path / "keyring.json"
    shutil.copyfile(keyring_path, path)
    path.chmod(0o600)
    return path


@pytest.fixture
def stack(settings: Settings, legacy_url: str, ring: Path) -> Iterator[tuple[Flask, Database]]:
    """A worker process and a web app on the legacy database."""
    with extra_worker(settings, database_url=legacy_url, private_keys_file=str(ring)) as (_producer, web):
        yield web, web.extensions["latchkey.db"]


def _revision(url: str) -> str:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one())
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def _verify(op: Caller) -> dict[str, Any]:
    resp = op.post("admin/backfill/verify", json={"batch_size": 3})
    assert resp.status_code == 202, resp.get_json()
    job = wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}", timeout=60)
    assert job["status"] == "succeeded", job
    result: dict[str, Any] = job["result"]
    text = json.dumps(result, ensure_ascii=False)
    assert not [v for v in VALUES if v in text]
    return result


def _contract_refused(url: str, reason: str) -> None:
    with pytest.raises(RuntimeError, match=reason):
        migrate.upgrade(url, "head")
    assert _revision(url) == migrate.PRE_CONTRACT
    assert "value" in _columns(url, "secrets") and "token" in _columns(url, "mcp_servers")


def test_contract_is_refused_before_verify_and_after_a_failed_verify(
    stack: tuple[Flask, Database], legacy_url: str, keyring: Keyring
) -> None:
    web, db = stack
    op = Factory(db, web.test_client()).user(operator=True)
    _contract_refused(legacy_url, "no backfill verification has run")
    run_backfill(db, keyring.public_set(), CTX, batch_size=4)
    _contract_refused(legacy_url, "no backfill verification has run")

    # Tamper: one MCP token secret re-sealed (validly) to another value; one legacy secret garbled.
    server_id = next(iter(MCP))
    with db.session() as s:
        ref = s.scalar(select(legacy.mcp_servers.c.secret_ref).where(legacy.mcp_servers.c.id == server_id))
        wrong = seal(keyring.public_set(), b"not-the-legacy-token", secret_context(ORG_A, ref, 1))
        s.execute(update(Secret).where(Secret.id == ref).values(ciphertext=wrong.ciphertext))
        s.execute(update(Secret).where(Secret.id == SA2).values(ciphertext=b"\x01garbled"))

    result = _verify(op)
    assert result["passed"] is False
    assert result["unmigrated"] == len(BAD_AGENTS)
    reasons = {(f["kind"], f["id"]): f["reason"].split(":")[0] for f in result["failures"]}
    assert reasons[("mcp_servers", server_id)] == "value_mismatch"
    assert reasons[("secrets", SA2)] == "does_not_open"
    assert result["counts"]["secrets"]["checked"] == len(LEGACY_SECRETS)
    assert result["counts"]["mcp_servers"]["checked"] == len(MCP)
    assert result["cache_check"]["ok"] is True, result["cache_check"]
    _contract_refused(legacy_url, "latest backfill verification .* failed")

    shown = op.get("admin/backfill").get_json()["latest_verification"]
    assert shown["id"] == result["id"] and shown["passed"] is False
    # The probe secret of the cache check is gone again.
    with db.session() as s:
        assert not s.scalars(select(Secret.name).where(Secret.name.like("latchkey_verify_probe_%"))).all()


def _fix_bad_agents(db: Database, admin: Caller, llm: LlmTestServer) -> None:
    """What an operator does with the rows the backfill refused: a provider by hand, or delete."""
    mistral = _id("f0000000", 3)
    body = {
        "name": "Mistral by hand",
        "provider_type": "openai_compatible",
        "kind": "mistral",
        "model_id": "large",
        "secret_ref": SA2,
        "config": {"base_url": llm.url + "/v1"},
    }
    created = admin.post("orgs/acme/providers", json=body)
    assert created.status_code == 201, created.get_json()
    assert admin.patch(f"orgs/acme/agents/{mistral}", json={"provider_id": created.get_json()["id"]}).status_code == 200
    for agent_id, (org, *_rest) in BAD_AGENTS.items():
        if agent_id != mistral:
            with db.session() as s:  # another org's admin would get a 404; delete as that org's admin
                slug = s.scalar(sa.text("SELECT slug FROM orgs WHERE id = :id"), {"id": org})
            owner = admin if slug == "acme" else Factory(db, admin.client).user(slug, "admin")
            assert owner.delete(f"orgs/{slug}/agents/{agent_id}").status_code == 204


def test_upgrade_backfill_verify_contract_then_mcp_and_agents_still_work(
    stack: tuple[Flask, Database],
    settings: Settings,
    legacy_url: str,
    ring: Path,
    llm_server: LlmTestServer,
) -> None:
    web, db = stack
    factory = Factory(db, web.test_client())
    op = factory.user(operator=True)
    admin = factory.user("acme", "admin")
    env = settings_env(settings.model_copy(update={"database_url": legacy_url, "private_keys_file": str(ring)}))
    env["LATCHKEY_QUEUE"] = web.config["LATCHKEY_SETTINGS"].queue
    runner = CliRunner()

    backfill = op.post("admin/backfill", json={"batch_size": 2}).get_json()["job"]["id"]
    assert wait_job(op.get, f"admin/jobs/{backfill}")["status"] == "succeeded"
    _fix_bad_agents(db, admin, llm_server)

    # A rotation between backfill and verify: the re-seal moves everything to the new key.
    keyring = Keyring.load(ring)
    new_kid = keyring.add_key()
    keyring.write(ring, overwrite=True)
    reseal = op.post("admin/keys/reseal").get_json()["job"]["id"]
    assert wait_job(op.get, f"admin/jobs/{reseal}", timeout=60)["status"] == "succeeded"
    with db.session() as s:
        assert set(s.scalars(select(Secret.key_id).distinct())) == {new_kid}

    verified = runner.invoke(main, ["backfill", "verify", "--batch-size", "3", "--timeout", "60"], env=env)
    assert verified.exit_code == 0, verified.stderr
    record = json.loads(verified.stdout)
    assert record["passed"] is True and record["unmigrated"] == 0 and record["failures"] == []
    assert record["counts"]["secrets"]["matched"] == len(LEGACY_SECRETS)
    assert record["counts"]["mcp_servers"]["matched"] == len(MCP)
    assert record["counts"]["agents"]["matched"] == len(AGENTS) + 1  # and the one fixed by hand
    assert record["cache_check"]["ok"] is True and all(record["cache_check"]["steps"].values())
    status = json.loads(runner.invoke(main, ["backfill", "status"], env=env).stdout)
    assert status["verification"]["id"] == record["id"]

    # A legacy row that changes after the verification needs a new one.
    with db.session() as s:
        s.execute(sa.text("UPDATE mcp_servers SET token = NULL WHERE id = :id"), {"id": next(iter(MCP))})
    _contract_refused(legacy_url, "legacy rows changed since the latest verification")
    assert _verify(op)["passed"] is True

    migrate.upgrade(legacy_url, "head")
    assert _revision(legacy_url) == migrate.heads()[0]
    assert "value" not in _columns(legacy_url, "secrets")
    assert "token" not in _columns(legacy_url, "mcp_servers")
    assert not {"model", "secret_ref"} & _columns(legacy_url, "agents")

    # Nothing reads a legacy field any more; MCP validation and an agent run work end to end.
    server_id = list(MCP)[1]
    with McpTestServer(token=TOKEN_SHARED) as mcp:
        patched = admin.patch(f"orgs/acme/mcp-servers/{server_id}", json={"url": mcp.url})
        assert patched.status_code == 200, patched.get_json()

        def valid() -> dict[str, Any] | None:
            server: dict[str, Any] = admin.get(f"orgs/acme/mcp-servers/{server_id}").get_json()
            return server if server["status"] in ("valid", "invalid") else None

        assert wait_for(valid, timeout=30)["status"] == "valid"
        assert mcp.seen_tokens and set(mcp.seen_tokens) == {TOKEN_SHARED}

    agent_id = next(iter(AGENTS))  # openai/gpt-4o on SA2
    with db.session() as s:
        provider_id = s.scalar(sa.text("SELECT provider_id FROM agents WHERE id = :id"), {"id": agent_id})
        assert s.scalar(select(Provider.secret_ref).where(Provider.id == provider_id)) == SA2
    config = {"config": {"base_url": llm_server.url + "/v1"}}
    assert admin.patch(f"orgs/acme/providers/{provider_id}", json=config).status_code == 200
    llm_server.reset()
    llm_server.script([{"text": "still works"}])
    run_id = admin.post(f"orgs/acme/agents/{agent_id}/runs", json={"input": "hi"}).get_json()["run"]["id"]

    def finished() -> dict[str, Any] | None:
        run: dict[str, Any] = admin.get(f"orgs/acme/runs/{run_id}").get_json()
        return run if run["status"] in ("succeeded", "failed") else None

    run = wait_for(finished, timeout=30)
    assert (run["status"], run["output"]) == ("succeeded", "still works"), run
    assert run["events"][-1]["type"] == "final"
    assert "sk-openai-and-anthropic-key-0123456789" in llm_server.requests[-1].headers["authorization"]
    assert llm_server.requests[-1].body["model"] == "gpt-4o"
    llm_server.reset()

    # After the contract: the backfill has nothing to do, and a verification passes vacuously.
    again = op.post("admin/backfill").get_json()["job"]["id"]
    assert wait_job(op.get, f"admin/jobs/{again}")["result"]["secrets"]["migrated"] == 0
    after = _verify(op)
    assert after["passed"] is True and after["legacy_rows"] == {"secrets": 0, "mcp_servers": 0, "agents": 0}
    assert op.get("admin/backfill").get_json()["legacy_columns"] is False

    # Rolling the contract back gives the columns back, empty (restore a backup for the values).
    migrate.downgrade(legacy_url, migrate.PRE_CONTRACT)
    with db.session() as s:
        assert s.scalar(sa.text("SELECT COUNT(*) FROM secrets WHERE value IS NOT NULL")) == 0
        assert s.scalar(select(sa.func.count()).select_from(BackfillVerification)) == 3
