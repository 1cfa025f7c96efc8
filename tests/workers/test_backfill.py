"""The backfill: legacy rows (revision 0001) into sealed secrets, MCP secret refs and providers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import func, select

from app import migrate
from app.backfill.service import run_backfill, slugify
from app.cli import main
from app.config import Settings
from app.context import Actor, RequestContext
from app.db import Database
from app.models import Agent, AuditEvent, McpServer, Provider, Secret
from app.secrets.keyring import Keyring
from app.secrets.sealing import open_sealed, secret_context
from tests import backends
from tests.factories import Factory
from tests.processes import settings_env
from tests.workers.conftest import wait_job

CTX = RequestContext(Actor("cli", "test"))
ORG_A, ORG_B, ORG_C = (f"00000000-0000-7000-8000-00000000000{c}" for c in "abc")


def _id(prefix: str, n: int) -> str:
    return f"{prefix}-0000-7000-8000-{n:012d}"


# Two ids sharing their first 8 characters: their `legacy_<8>` names collide.
SA1, SA1B, SA2, SA3 = _id("a1a1a1a1", 1), _id("a1a1a1a1", 2), _id("a2a2a2a2", 3), _id("a3a3a3a3", 4)
SB1, SC1 = _id("b1b1b1b1", 5), _id("c1c1c1c1", 6)
UNICODE_VALUE = "pässwörd 🔑 秘密 'quoted' \"double\"\nsecond line"
TOKEN_SHARED, TOKEN_OTHER = "mcp-shared-token-0123456789abcdef", "mcp-ünïcode-token-🔑-0123456789"

LEGACY_SECRETS = {
    SA1: (ORG_A, UNICODE_VALUE),
    SA1B: (ORG_A, "x"),
    SA2: (ORG_A, "sk-openai-and-anthropic-key-0123456789"),
    SA3: (ORG_A, " leading and trailing spaces "),
    SB1: (ORG_B, "sk-org-b-key-0123456789abcdefghij"),
    SC1: (ORG_C, "sk-org-c"),
}
MCP = {
    _id("d0000000", 1): (ORG_A, "Docs Server ü", TOKEN_SHARED),
    _id("d0000000", 2): (ORG_A, "docs / beta!!", TOKEN_SHARED),
    _id("d0000000", 3): (ORG_A, "日本語", TOKEN_OTHER),
    _id("d0000000", 4): (ORG_B, "Docs Server ü", TOKEN_SHARED),
    _id("d0000000", 5): (ORG_C, "x" * 200, "tok-c"),
}
# agent id -> (org, model, secret_ref)
AGENTS = {
    _id("e0000000", 1): (ORG_A, "openai/gpt-4o", SA2),
    _id("e0000000", 2): (ORG_A, "openai/gpt-4o-mini", SA2),
    _id("e0000000", 3): (ORG_A, "anthropic/claude-3-5-sonnet", SA2),
    _id("e0000000", 4): (ORG_A, "openai/gpt-4o", SA3),
    _id("e0000000", 5): (ORG_B, "openai/gpt-4o", SB1),
    _id("e0000000", 6): (ORG_C, "anthropic/claude-3-opus", SC1),
    _id("e0000000", 7): (ORG_C, "openai/o1", SC1),
}
# Agents the backfill must refuse, and why.
BAD_AGENTS = {
    _id("f0000000", 1): (ORG_A, "openai/gpt-4o", _id("99999999", 9), "secret_not_found"),
    _id("f0000000", 2): (ORG_A, "openai/gpt-4o", SB1, "secret_not_found"),  # another org's secret
    _id("f0000000", 3): (ORG_A, "mistral/large", SA2, "unsupported_kind"),
    _id("f0000000", 4): (ORG_B, "no-slash", SB1, "invalid_model"),
}
EXPECTED_PROVIDERS = 6  # (A,SA2,openai) (A,SA2,anthropic) (A,SA3,openai) (B,SB1,openai) (C,SC1,anthropic|openai)


def _insert_legacy(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for org, slug in ((ORG_A, "acme"), (ORG_B, "bravo"), (ORG_C, "charlie")):
                conn.execute(
                    sa.text("INSERT INTO orgs (id, slug, name) VALUES (:id, :slug, :name)"),
                    {"id": org, "slug": slug, "name": slug.title()},
                )
            for sid, (org, value) in LEGACY_SECRETS.items():
                conn.execute(
                    sa.text("INSERT INTO secrets (id, org_id, value) VALUES (:id, :org, :v)"),
                    {"id": sid, "org": org, "v": value},
                )
            for mid, (org, name, token) in MCP.items():
                conn.execute(
                    sa.text("INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :org, :n, :u, :t)"),
                    {"id": mid, "org": org, "n": name, "u": "https://mcp.example.com/mcp", "t": token},
                )
            for aid, (org, model, ref) in AGENTS.items():
                conn.execute(
                    sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :n, :m, :r)"),
                    {"id": aid, "org": org, "n": f"agent {aid[:4]}", "m": model, "r": ref},
                )
            for aid, (org, model, ref, _reason) in BAD_AGENTS.items():
                conn.execute(
                    sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :n, :m, :r)"),
                    {"id": aid, "org": org, "n": "bad", "m": model, "r": ref},
                )
    finally:
        engine.dispose()


@pytest.fixture
def legacy_url(tmp_path: Path) -> Iterator[str]:
    """A database built at revision 0001 with legacy rows, then upgraded to head."""
    name = f"latchkey_backfill_{backends.worker_suffix()}_{uuid.uuid4().hex[:10]}"
    pg = backends.fresh_postgres_database(name)
    url = pg or f"sqlite:///{tmp_path / 'legacy.db'}"
    try:
        migrate.upgrade(url, "0001")
        _insert_legacy(url)
        migrate.upgrade(url, "head")
        yield url
    finally:
        if pg:
            backends.drop_postgres_database(name)


@pytest.fixture
def legacy_db(legacy_url: str) -> Iterator[Database]:
    database = Database()
    database.configure(legacy_url)
    yield database
    database.dispose()


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.session() as s:
        for model in (Secret, McpServer, Agent, Provider):
            table = model.__table__
            rows = s.execute(select(table).order_by(table.c.id)).all()  # type: ignore[attr-defined]
            out[model.__tablename__] = [tuple(r) for r in rows]
    return out


def opens(keyring: Keyring, secret: Secret) -> str:
    assert secret.ciphertext is not None
    plain = open_sealed(keyring, secret.ciphertext, secret_context(secret.org_id, secret.id, secret.version))
    return plain.decode("utf-8")


def assert_complete(db: Database, keyring: Keyring) -> None:
    """Everything migrated, every reference opens to its legacy value, tenancy, no duplicates."""
    with db.session() as s:
        secrets = {x.id: x for x in s.scalars(select(Secret))}
        for sid, (org, value) in LEGACY_SECRETS.items():
            secret = secrets[sid]
            assert secret.org_id == org and secret.version == 1 and secret.key_id == keyring.current_kid
            assert secret.name and secret.name.startswith(f"legacy_{sid[:8]}")
            assert opens(keyring, secret) == value
            assert secret.value == value  # kept for verify; the contract migration drops it
        names = [(x.org_id, x.name) for x in secrets.values()]
        assert len(names) == len(set(names))

        servers = {m.id: m for m in s.scalars(select(McpServer))}
        for mid, (org, _name, token) in MCP.items():
            ref = servers[mid].secret_ref
            assert ref is not None and secrets[ref].org_id == org
            assert opens(keyring, secrets[ref]) == token
            assert secrets[ref].name and secrets[ref].name.startswith("mcp_")

        # No orphan: every sealed secret is a legacy one or held by a server.
        held = {m.secret_ref for m in servers.values()}
        assert set(secrets) == set(LEGACY_SECRETS) | held

        providers = {p.id: p for p in s.scalars(select(Provider))}
        assert len(providers) == EXPECTED_PROVIDERS
        triples = [(p.org_id, p.secret_ref, p.kind) for p in providers.values()]
        assert len(triples) == len(set(triples))
        agents = {a.id: a for a in s.scalars(select(Agent))}
        for aid, (org, model, ref) in AGENTS.items():
            agent = agents[aid]
            assert agent.provider_id is not None
            provider = providers[agent.provider_id]
            kind, model_id = model.split("/", 1)
            assert provider.org_id == org and provider.secret_ref == ref and provider.kind == kind
            assert provider.provider_type == kind and provider.config == {}
            assert (agent.model_id or provider.model_id) == model_id
        for aid in BAD_AGENTS:
            assert agents[aid].provider_id is None


def counts(db: Database) -> tuple[int, int, int]:
    with db.session() as s:
        return (
            int(s.scalar(select(func.count()).select_from(Secret)) or 0),
            int(s.scalar(select(func.count()).select_from(Provider)) or 0),
            int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0),
        )


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
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded" and job["result"] == summary
    assert job["progress"]["done"] == job["progress"]["total"] > 0


def test_operator_route_runs_backfill_on_a_worker(
    worker: Any, db: Database, factory: Factory, keyring: Keyring, settings: Settings
) -> None:
    org = factory.org()
    with db.session() as s:
        org_id = s.scalar(sa.text("SELECT id FROM orgs WHERE slug = :s"), {"s": org})
        s.execute(
            sa.text("INSERT INTO secrets (id, org_id, value, version) VALUES (:id, :o, :v, 1)"),
            {"id": SA2, "o": org_id, "v": "sk-legacy-value-0123456789abc"},
        )
        s.execute(
            sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :o, 'a', :m, :r)"),
            {"id": _id("e0000000", 1), "o": org_id, "m": "openai/gpt-4o", "r": SA2},
        )
    admin = factory.user(org, "admin")
    assert admin.post("admin/backfill").status_code == 403
    op = factory.user(operator=True)
    bad = op.post("admin/backfill", json={"batch_size": 0})
    assert bad.status_code == 422

    dry = op.post("admin/backfill", json={"dry_run": True})
    assert dry.status_code == 202, dry.get_json()
    done = wait_job(op.get, f"admin/jobs/{dry.get_json()['job']['id']}")
    assert done["status"] == "succeeded" and done["result"]["agents"]["migrated"] == 1
    with db.session() as s:
        assert s.scalar(select(Secret.ciphertext).where(Secret.id == SA2)) is None

    resp = op.post("admin/backfill")  # an empty POST works
    assert resp.status_code == 202, resp.get_json()
    done = wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}")
    assert done["status"] == "succeeded", done
    assert done["result"]["secrets"]["migrated"] == 1 and done["result"]["created"]["providers"] == 1
    assert done["progress"]["done"] == done["progress"]["total"] == 2
    with db.session() as s:
        secret = s.scalar(select(Secret).where(Secret.id == SA2))
        assert secret is not None and opens(keyring, secret) == "sk-legacy-value-0123456789abc"
        agent = s.scalar(select(Agent).where(Agent.id == _id("e0000000", 1)))
        assert agent is not None and agent.provider_id is not None
