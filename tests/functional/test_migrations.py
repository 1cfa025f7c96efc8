"""Alembic migrations on PostgreSQL and SQLite: one head, models match, round trips, legacy data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy.exc import IntegrityError

from app import migrate
from app.cli import main
from app.db import make_engine
from tests.support import backends

ORG_A, ORG_B = "00000000-0000-7000-8000-00000000000a", "00000000-0000-7000-8000-00000000000b"
SECRET_A, SECRET_B = "00000000-0000-7000-8000-0000000000a1", "00000000-0000-7000-8000-0000000000b1"
MCP_A, AGENT_A = "00000000-0000-7000-8000-0000000000a2", "00000000-0000-7000-8000-0000000000a3"
UNICODE_VALUE = "pässwörd 🔑 秘密 'quoted' \"double\"\nsecond line"
RAW_TOKEN = "mcp-raw-bearer-token-0123456789"


@pytest.fixture(params=["postgresql", "sqlite"])
def blank_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no tables at all) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    name = f"latchkey_mig_{backends.worker_suffix()}_{uuid.uuid4().hex[:10]}"
    url = backends.fresh_postgres_database(name)
    if url is None:
        pytest.skip("PostgreSQL is not reachable (or LATCHKEY_TEST_BACKEND=sqlite)")
    try:
        yield url
    finally:
        backends.drop_postgres_database(name)


def _engine(url: str) -> sa.Engine:
    return make_engine(url)


def _query(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def _execute(url: str, *statements: tuple[str, dict[str, Any]]) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            for sql, params in statements:
                conn.execute(sa.text(sql), params)
    finally:
        engine.dispose()


def _current_revision(url: str) -> str | None:
    engine = _engine(url)
    try:
        if not sa.inspect(engine).has_table("alembic_version"):
            return None
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    assert len(rows) <= 1
    return rows[0] if rows else None


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> set[str]:
    engine = _engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def _insert_legacy_rows(url: str) -> None:
    """Rows as the pre-managed-secrets release wrote them (schema 0001), in plain SQL."""
    _execute(
        url,
        ("INSERT INTO orgs (id, slug, name) VALUES (:id, :slug, :name)", {"id": ORG_A, "slug": "acme", "name": "Acme"}),
        ("INSERT INTO orgs (id, slug, name) VALUES (:id, :slug, :name)", {"id": ORG_B, "slug": "other", "name": "O"}),
        (
            "INSERT INTO secrets (id, org_id, value) VALUES (:id, :org, :v)",
            {"id": SECRET_A, "org": ORG_A, "v": UNICODE_VALUE},
        ),
        (
            "INSERT INTO secrets (id, org_id, value) VALUES (:id, :org, :v)",
            {"id": SECRET_B, "org": ORG_B, "v": "sk-other-org"},
        ),
        (
            "INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :org, :name, :url, :token)",
            {"id": MCP_A, "org": ORG_A, "name": "docs", "url": "https://mcp.example.com/mcp", "token": RAW_TOKEN},
        ),
        (
            "INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :name, :model, :ref)",
            {"id": AGENT_A, "org": ORG_A, "name": "helper", "model": "openai/gpt-4o", "ref": SECRET_A},
        ),
    )


def _assert_legacy_rows_intact(url: str) -> None:
    orgs = _query(url, "SELECT id, slug, name FROM orgs ORDER BY id")
    assert orgs == [(ORG_A, "acme", "Acme"), (ORG_B, "other", "O")]
    secrets = _query(
        url, "SELECT id, org_id, value FROM secrets WHERE id IN (:a, :b) ORDER BY id", a=SECRET_A, b=SECRET_B
    )
    assert secrets == [(SECRET_A, ORG_A, UNICODE_VALUE), (SECRET_B, ORG_B, "sk-other-org")]
    servers = _query(url, "SELECT id, org_id, name, url, token FROM mcp_servers")
    assert servers == [(MCP_A, ORG_A, "docs", "https://mcp.example.com/mcp", RAW_TOKEN)]
    agents = _query(url, "SELECT id, org_id, name, model, secret_ref FROM agents")
    assert agents == [(AGENT_A, ORG_A, "helper", "openai/gpt-4o", SECRET_A)]


# Revision graph -----------------------------------------------------------------------------


def test_there_is_exactly_one_head_and_the_first_revision_is_0001() -> None:
    heads = migrate.heads()
    assert len(heads) == 1
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert script.get_bases() == ["0001"]
    # Every revision is reachable from the single head down to 0001 (no orphaned branch).
    chain = [rev.revision for rev in script.walk_revisions("base", heads[0])]
    assert chain[-1] == "0001"
    assert set(chain) == {rev.revision for rev in script.walk_revisions()}


# Schema -----------------------------------------------------------------------------------


def test_upgrade_to_head_matches_the_models(blank_url: str) -> None:
    migrate.upgrade(blank_url, "head")
    assert _current_revision(blank_url) == migrate.heads()[0]
    # Raises AutoGenerateDiffsDetected when the models and the migrations disagree.
    command.check(migrate.alembic_config(blank_url))


def test_downgrade_to_0001_and_base_then_upgrade_again(blank_url: str) -> None:
    migrate.upgrade(blank_url, "head")
    head_tables = _tables(blank_url)

    migrate.downgrade(blank_url, "0001")
    assert _current_revision(blank_url) == "0001"
    assert _tables(blank_url) == {"orgs", "secrets", "mcp_servers", "agents"}
    assert _columns(blank_url, "secrets") == {"id", "org_id", "value"}
    assert _columns(blank_url, "mcp_servers") == {"id", "org_id", "name", "url", "token"}
    assert _columns(blank_url, "agents") == {"id", "org_id", "name", "model", "secret_ref"}

    migrate.downgrade(blank_url, "base")
    assert _current_revision(blank_url) is None
    assert _tables(blank_url) == set()

    migrate.upgrade(blank_url, "head")
    assert _current_revision(blank_url) == migrate.heads()[0]
    assert _tables(blank_url) == head_tables
    command.check(migrate.alembic_config(blank_url))


# Legacy data -------------------------------------------------------------------------------


def test_legacy_rows_survive_the_upgrade_with_defaults_for_new_columns(blank_url: str) -> None:
    migrate.upgrade(blank_url, "0001")
    _insert_legacy_rows(blank_url)

    migrate.upgrade(blank_url, migrate.PRE_CONTRACT)

    _assert_legacy_rows_intact(blank_url)
    secrets = _query(
        blank_url, "SELECT version, name, ciphertext, key_id, created_at FROM secrets WHERE id = :id", id=SECRET_A
    )
    assert len(secrets) == 1
    version, name, ciphertext, key_id, created_at = secrets[0]
    assert (version, name, ciphertext, key_id) == (1, None, None, None)
    assert created_at is not None
    servers = _query(blank_url, "SELECT status, transport, secret_ref, tool_count FROM mcp_servers")
    assert servers == [("pending", "streamable_http", None, 0)]
    agents = _query(blank_url, "SELECT provider_id, model_id FROM agents")
    assert agents == [(None, None)]


def test_downgrading_the_expand_revision_keeps_never_backfilled_legacy_rows(blank_url: str) -> None:
    migrate.upgrade(blank_url, "0001")
    _insert_legacy_rows(blank_url)
    migrate.upgrade(blank_url, "0002")

    migrate.downgrade(blank_url, "0001")

    assert _current_revision(blank_url) == "0001"
    assert _columns(blank_url, "secrets") == {"id", "org_id", "value"}
    _assert_legacy_rows_intact(blank_url)


def test_downgrade_refuses_while_a_sealed_only_secret_exists(blank_url: str) -> None:
    migrate.upgrade(blank_url, "0001")
    _insert_legacy_rows(blank_url)
    migrate.upgrade(blank_url, migrate.PRE_CONTRACT)
    head = _current_revision(blank_url)
    sealed_id = "00000000-0000-7000-8000-0000000000c1"
    _execute(
        blank_url,
        (
            "INSERT INTO secrets (id, org_id, name, ciphertext, key_id, value) "
            "VALUES (:id, :org, :name, :ct, :kid, NULL)",
            {"id": sealed_id, "org": ORG_A, "name": "SEALED", "ct": b"\x01sealed-bytes", "kid": "lk-20260101-0a0b0c0d"},
        ),
    )

    with pytest.raises(RuntimeError, match=r"\b1 secret\(s\)"):
        migrate.downgrade(blank_url, "0001")

    assert _current_revision(blank_url) == head
    assert "ciphertext" in _columns(blank_url, "secrets")
    assert "providers" in _tables(blank_url)
    rows = _query(blank_url, "SELECT name, ciphertext, value FROM secrets WHERE id = :id", id=sealed_id)
    assert [(r[0], bytes(r[1]), r[2]) for r in rows] == [("SEALED", b"\x01sealed-bytes", None)]
    _assert_legacy_rows_intact(blank_url)


# Constraints --------------------------------------------------------------------------------


def test_an_mcp_server_cannot_reference_a_secret_of_another_org(blank_url: str) -> None:
    migrate.upgrade(blank_url, "0001")
    _insert_legacy_rows(blank_url)
    migrate.upgrade(blank_url, migrate.PRE_CONTRACT)
    insert = "INSERT INTO mcp_servers (id, org_id, name, url, secret_ref) VALUES (:id, :org, :name, :url, :ref)"

    # Control: a reference to a secret of the same org is accepted.
    _execute(
        blank_url,
        (insert, {"id": str(uuid.uuid4()), "org": ORG_A, "name": "same-org", "url": "https://a.test", "ref": SECRET_A}),
    )

    with pytest.raises(IntegrityError):
        _execute(
            blank_url,
            (
                insert,
                {"id": str(uuid.uuid4()), "org": ORG_A, "name": "cross-org", "url": "https://b.test", "ref": SECRET_B},
            ),
        )
    names = [r[0] for r in _query(blank_url, "SELECT name FROM mcp_servers ORDER BY name")]
    assert names == ["docs", "same-org"]


# Contract -----------------------------------------------------------------------------------


def test_upgrading_legacy_data_straight_to_head_is_refused_as_one_transaction(blank_url: str) -> None:
    migrate.upgrade(blank_url, "0001")
    _insert_legacy_rows(blank_url)

    with pytest.raises(RuntimeError, match="no backfill verification has run"):
        migrate.upgrade(blank_url, "head")

    # The whole run was one transaction: nothing of 0002-0005 stayed behind either.
    assert _current_revision(blank_url) == "0001"
    assert _tables(blank_url) == {"orgs", "secrets", "mcp_servers", "agents"}
    _assert_legacy_rows_intact(blank_url)


def test_a_fresh_install_contracts_without_a_verification_and_downgrades_back(blank_url: str) -> None:
    migrate.upgrade(blank_url, "head")
    assert "value" not in _columns(blank_url, "secrets") and "token" not in _columns(blank_url, "mcp_servers")
    assert not {"model", "secret_ref"} & _columns(blank_url, "agents")

    migrate.downgrade(blank_url, migrate.PRE_CONTRACT)
    assert "value" in _columns(blank_url, "secrets") and "token" in _columns(blank_url, "mcp_servers")
    assert {"model", "secret_ref"} <= _columns(blank_url, "agents")


def test_a_sealed_secret_without_ciphertext_cannot_exist_after_the_contract(blank_url: str) -> None:
    migrate.upgrade(blank_url, "head")
    _execute(blank_url, ("INSERT INTO orgs (id, slug, name) VALUES (:id, 'acme', 'Acme')", {"id": ORG_A}))
    with pytest.raises(IntegrityError):
        _execute(
            blank_url,
            (
                "INSERT INTO secrets (id, org_id, name, key_id) VALUES (:id, :org, 'N', 'k')",
                {"id": SECRET_A, "org": ORG_A},
            ),
        )


# CLI ----------------------------------------------------------------------------------------


def test_cli_db_upgrade_and_downgrade_to_0001(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()

    up = runner.invoke(main, ["db", "upgrade"], env={"LATCHKEY_DATABASE_URL": url})
    assert up.exit_code == 0, up.output
    assert _current_revision(url) == migrate.heads()[0]
    assert "providers" in _tables(url)

    down = runner.invoke(main, ["db", "downgrade", "0001"], env={"LATCHKEY_DATABASE_URL": url})
    assert down.exit_code == 0, down.output
    assert _current_revision(url) == "0001"
    assert _tables(url) == {"orgs", "secrets", "mcp_servers", "agents"}

    again = runner.invoke(main, ["db", "upgrade", "0002"], env={"LATCHKEY_DATABASE_URL": url})
    assert again.exit_code == 0, again.output
    assert _current_revision(url) == "0002"


def test_the_release_step_expands_a_database_with_unverified_legacy_data_and_exits_0(tmp_path: Path) -> None:
    """The Procfile's release (`latchkey db upgrade`) must not stop a deploy while a backfill is pending."""
    url = f"sqlite:///{tmp_path / 'release.db'}"
    migrate.upgrade(url, "0001")
    _insert_legacy_rows(url)
    runner = CliRunner()

    release = runner.invoke(main, ["db", "upgrade"], env={"LATCHKEY_DATABASE_URL": url})

    assert release.exit_code == 0, release.output
    lines = release.stdout.strip().splitlines()
    assert len(lines) == 1 and "latchkey backfill run" in lines[0] and migrate.PRE_CONTRACT in lines[0]
    assert _current_revision(url) == migrate.PRE_CONTRACT
    assert "value" in _columns(url, "secrets")  # the legacy data is still there for the backfill
    # Asked for explicitly, the contract still refuses (and changes nothing).
    head = runner.invoke(main, ["db", "upgrade", "head"], env={"LATCHKEY_DATABASE_URL": url})
    assert head.exit_code != 0 and "refusing to contract" in head.stderr
    assert _current_revision(url) == migrate.PRE_CONTRACT
    # Run again (the next release): the same answer, nothing else changes.
    again = runner.invoke(main, ["db", "upgrade"], env={"LATCHKEY_DATABASE_URL": url})
    assert again.exit_code == 0 and again.stdout == release.stdout


def test_cli_db_downgrade_refusal_is_one_line_and_non_zero(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate.upgrade(url, "0001")
    _insert_legacy_rows(url)
    migrate.upgrade(url, migrate.PRE_CONTRACT)
    _execute(
        url,
        (
            "UPDATE secrets SET value = NULL, name = 'N', ciphertext = :ct, key_id = 'k' WHERE id = :id",
            {"ct": b"x", "id": SECRET_B},
        ),
    )

    result = CliRunner().invoke(main, ["db", "downgrade", "0001"], env={"LATCHKEY_DATABASE_URL": url})

    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latchkey: ") and "1 secret(s)" in lines[0]
    assert _current_revision(url) == migrate.PRE_CONTRACT
