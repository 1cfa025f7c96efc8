"""The `latchkey` CLI against a throwaway SQLite database: keys, orgs, users, tokens, audit."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from app import migrate
from app.cli import main
from app.config import load_settings
from app.db import Database
from app.factory import create_app
from app.identity import service as identity
from app.secrets.keyring import Keyring, PublicKeySet

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}", "head")
    return path


@pytest.fixture
def db_path(template_db: Path, tmp_path: Path) -> Path:
    """A fresh copy of a migrated database for each test."""
    path = tmp_path / "cli.db"
    src, dst = sqlite3.connect(template_db), sqlite3.connect(path)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return path


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def cli(url: str) -> CliRunner:
    return CliRunner(env={"LATCHKEY_DATABASE_URL": url})


def run(cli: CliRunner, *args: str, input: str | None = None) -> Result:
    return cli.invoke(main, list(args), input=input)


def ok(cli: CliRunner, *args: str, input: str | None = None) -> str:
    result = run(cli, *args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def assert_one_line_failure(result: Result, *fragments: str) -> str:
    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("latchkey: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def _sql(db_path: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            return conn.execute(statement, params).fetchall()
    finally:
        conn.close()


# keys -------------------------------------------------------------------------------------------


def test_keys_generate_writes_a_private_file_and_prints_the_public_set(cli: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "keyring.json"
    result = run(cli, "keys", "generate", "--out", str(out))
    assert result.exit_code == 0, result.stderr

    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    public = PublicKeySet.parse(lines[0])
    ring = Keyring.load(out)
    assert public.kids == ring.public_set().kids
    assert not public.has_dev_keys
    # The printed set is public only: no private key from the file appears on stdout.
    private_keys = [entry["private_key"] for entry in json.loads(out.read_text())["keys"]]
    assert private_keys and not any(k in result.stdout for k in private_keys)


def test_keys_generate_refuses_to_overwrite_without_force(cli: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "keyring.json"
    ok(cli, "keys", "generate", "--out", str(out))
    before = out.read_bytes()

    refused = run(cli, "keys", "generate", "--out", str(out))
    assert_one_line_failure(refused)
    assert refused.stdout == ""
    assert out.read_bytes() == before

    forced = ok(cli, "keys", "generate", "--out", str(out), "--force")
    assert out.read_bytes() != before
    assert PublicKeySet.parse(forced.strip()).kids == Keyring.load(out).public_set().kids
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


# orgs, users, members, tokens -------------------------------------------------------------------


def test_bootstrap_an_org_admin_whose_token_authenticates_against_the_api(cli: CliRunner, url: str) -> None:
    ok(cli, "org", "create", "acme", "--name", "Acme Corp")
    ok(cli, "user", "create", "Ops@Example.test", "--operator", "--password-stdin", input=PASSWORD + "\n")
    ok(cli, "member", "add", "acme", "ops@example.test", "--role", "admin")
    token_out = ok(cli, "token", "create", "ops@example.test", "--name", "bootstrap")

    lines = token_out.splitlines()
    assert len(lines) == 1
    token = lines[0]
    assert token.startswith("lk_") and token == token.strip()

    app = create_app(load_settings({}, env="test", database_url=url, secret_key="cli-test-" + "k" * 32))
    try:
        client = app.test_client()
        me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200
        body = me.get_json()
        assert body["email"] == "ops@example.test"
        assert body["is_operator"] is True
        assert [(o["slug"], o["name"], o["role"]) for o in body["orgs"]] == [("acme", "Acme Corp", "admin")]
        assert client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
        # The CLI adds members directly (trusted operator); its tokens have no parent token.
        (listed,) = client.get("/api/v1/me/tokens", headers={"Authorization": f"Bearer {token}"}).get_json()["items"]
        assert listed["parent_id"] is None
    finally:
        app.extensions["latchkey.db"].dispose()

    db = Database()
    db.configure(url)
    try:
        with db.session() as s:
            assert identity.check_password(s, "ops@example.test", PASSWORD).is_operator
    finally:
        db.dispose()


def test_user_create_without_password_is_token_only_and_not_an_operator(cli: CliRunner, db_path: Path) -> None:
    user_id = ok(cli, "user", "create", "dev@example.test").strip()
    rows = _sql(db_path, "SELECT id, password_hash, is_operator FROM users")
    assert rows == [(user_id, None, 0)]


def test_creating_an_org_twice_fails_with_one_line(cli: CliRunner, db_path: Path) -> None:
    ok(cli, "org", "create", "acme")
    assert_one_line_failure(run(cli, "org", "create", "acme"), "acme", "already exists")
    assert _sql(db_path, "SELECT slug FROM orgs") == [("acme",)]


@pytest.mark.parametrize("slug", ["Bad_Slug", "has space", "trailing-", "ünïcode", "x" * 64])
def test_org_create_rejects_a_bad_slug(cli: CliRunner, db_path: Path, slug: str) -> None:
    assert_one_line_failure(run(cli, "org", "create", slug), "slug")
    assert _sql(db_path, "SELECT COUNT(*) FROM orgs") == [(0,)]


def test_member_add_to_an_unknown_org_fails_with_one_line(cli: CliRunner, db_path: Path) -> None:
    ok(cli, "user", "create", "someone@example.test")
    assert_one_line_failure(run(cli, "member", "add", "nope", "someone@example.test", "--role", "member"), "nope")
    assert _sql(db_path, "SELECT COUNT(*) FROM memberships") == [(0,)]


def test_member_add_of_an_unknown_user_fails_with_one_line(cli: CliRunner) -> None:
    ok(cli, "org", "create", "acme")
    assert_one_line_failure(run(cli, "member", "add", "acme", "ghost@example.test", "--role", "member"), "ghost")


def test_member_add_rejects_an_unknown_role_before_touching_the_database(cli: CliRunner, db_path: Path) -> None:
    ok(cli, "org", "create", "acme")
    ok(cli, "user", "create", "someone@example.test")
    result = run(cli, "member", "add", "acme", "someone@example.test", "--role", "owner")
    assert result.exit_code == 2
    assert "--role" in result.stderr
    assert _sql(db_path, "SELECT COUNT(*) FROM memberships") == [(0,)]


def test_token_create_for_an_unknown_user_prints_no_token(cli: CliRunner, db_path: Path) -> None:
    result = run(cli, "token", "create", "ghost@example.test")
    assert_one_line_failure(result, "ghost@example.test")
    assert result.stdout == ""
    assert _sql(db_path, "SELECT COUNT(*) FROM api_tokens") == [(0,)]


def test_user_create_with_a_short_password_fails_with_one_line(cli: CliRunner, db_path: Path) -> None:
    result = run(cli, "user", "create", "a@example.test", "--password-stdin", input="short\n")
    assert_one_line_failure(result, "password")
    assert "short" not in result.stderr.replace("password", "")
    assert _sql(db_path, "SELECT COUNT(*) FROM users") == [(0,)]


# audit verify -----------------------------------------------------------------------------------


def _org_with_three_events(cli: CliRunner, db_path: Path) -> str:
    ok(cli, "org", "create", "acme")
    for email in ("a@example.test", "b@example.test"):
        ok(cli, "user", "create", email)
        ok(cli, "member", "add", "acme", email, "--role", "admin")
    (org_id,) = _sql(db_path, "SELECT id FROM orgs WHERE slug = 'acme'")[0]
    assert _sql(db_path, "SELECT seq FROM audit_events WHERE chain = ? ORDER BY seq", (org_id,)) == [(1,), (2,), (3,)]
    return str(org_id)


def test_audit_verify_passes_on_an_untouched_database(cli: CliRunner, db_path: Path) -> None:
    org_id = _org_with_three_events(cli, db_path)
    result = run(cli, "audit", "verify")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert f"{org_id}: 3 events, ok" in result.stdout
    assert "instance: " in result.stdout
    assert "TAMPERED" not in result.stdout
    assert ok(cli, "audit", "verify", "acme").strip() == f"{org_id}: 3 events, ok"


def test_audit_verify_detects_an_edited_event(cli: CliRunner, db_path: Path) -> None:
    org_id = _org_with_three_events(cli, db_path)
    _sql(
        db_path,
        "UPDATE audit_events SET details = ? WHERE chain = ? AND seq = 1",
        (json.dumps({"slug": "someone-else"}), org_id),
    )

    result = run(cli, "audit", "verify")

    assert result.exit_code != 0
    assert f"{org_id}: 3 events, TAMPERED" in result.stdout
    assert "seq 1" in result.stdout
    assert_one_line_failure(result, "1 audit chain(s)")
    # The other chain is still reported as intact.
    assert "instance: " in result.stdout and ", ok" in result.stdout


def test_audit_verify_detects_a_deleted_middle_event(cli: CliRunner, db_path: Path) -> None:
    org_id = _org_with_three_events(cli, db_path)
    _sql(db_path, "DELETE FROM audit_events WHERE chain = ? AND seq = 2", (org_id,))

    result = run(cli, "audit", "verify", "acme")

    assert result.exit_code != 0
    assert f"{org_id}: 2 events, TAMPERED" in result.stdout
    assert "missing" in result.stdout
    assert_one_line_failure(result, "1 audit chain(s)")


def test_audit_verify_detects_a_deleted_last_event(cli: CliRunner, db_path: Path) -> None:
    org_id = _org_with_three_events(cli, db_path)
    _sql(db_path, "DELETE FROM audit_events WHERE chain = ? AND seq = 3", (org_id,))

    result = run(cli, "audit", "verify", "acme")

    assert result.exit_code != 0
    assert "TAMPERED" in result.stdout and "head is at seq 3" in result.stdout


def test_cli_sees_the_same_database_as_sqlalchemy(url: str, cli: CliRunner) -> None:
    org_id = ok(cli, "org", "create", "acme").strip()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM orgs WHERE slug = 'acme'")).scalar_one() == org_id
    finally:
        engine.dispose()
