"""The ``latchkey`` command: operators' entry point (exit 0 on success, a one-line reason otherwise)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.orm import Session

from app.config import ConfigError, Settings, load_settings
from app.context import cli_context
from app.db import Database
from app.errors import LatchkeyError

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"latchkey: {message}", err=True)
    sys.exit(code)


def one_line_errors(fn: F) -> F:
    """Turn expected failures into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), 2)
        except LatchkeyError as exc:
            _fail(exc.detail)
        except Exception as exc:
            from app.secrets.keyring import KeyringError

            if isinstance(exc, KeyringError):
                _fail(str(exc))
            raise

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return load_settings()


@contextmanager
def unit_of_work() -> Iterator[Session]:
    db = Database()
    db.configure(settings().database_url)
    try:
        with db.session() as s:
            yield s
    finally:
        db.dispose()


@click.group()
@click.version_option(package_name="latchkey")
def main() -> None:
    """Latchkey: managed secrets for AI agents and MCP servers."""


# db ----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Schema migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@one_line_errors
def db_upgrade(revision: str) -> None:
    """Upgrade the schema to REVISION (default: head)."""
    from app import migrate

    migrate.upgrade(settings().database_url, revision)


@db.command("downgrade")
@click.argument("revision")
@one_line_errors
def db_downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (e.g. 0001, the legacy schema)."""
    from app import migrate

    try:
        migrate.downgrade(settings().database_url, revision)
    except RuntimeError as exc:  # a migration refusing to lose data says why
        _fail(str(exc))


# keys --------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Sealing keys."""


@keys.command("generate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dev", is_flag=True, help="Mark the keys as development keys (refused in production).")
@click.option("--force", is_flag=True, help="Overwrite an existing keyring file.")
@one_line_errors
def keys_generate(out: Path, dev: bool, force: bool) -> None:
    """Write a new private keyring to OUT (mode 0600) and print the public key set."""
    from app.secrets.keyring import Keyring

    ring = Keyring.generate(dev=dev)
    ring.write(out, overwrite=force)
    click.echo(ring.public_set().dumps())


# orgs, users, members, tokens -------------------------------------------------------------


@main.group()
def org() -> None:
    """Organisations."""


@org.command("create")
@click.argument("slug")
@click.option("--name", default=None)
@one_line_errors
def org_create(slug: str, name: str | None) -> None:
    """Create an org with SLUG."""
    from app.identity import service as identity

    with unit_of_work() as s:
        created = identity.create_org(s, cli_context(), slug, name)
        click.echo(created.id)


@main.group()
def user() -> None:
    """Users."""


@user.command("create")
@click.argument("email")
@click.option("--operator", is_flag=True, help="Make the user an instance operator.")
@click.option("--password-stdin", is_flag=True, help="Read the login password from standard input.")
@one_line_errors
def user_create(email: str, operator: bool, password_stdin: bool) -> None:
    """Create a user (token-only unless --password-stdin)."""
    from app.identity import service as identity

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    with unit_of_work() as s:
        created = identity.create_user(s, cli_context(), email, password, operator=operator)
        click.echo(created.id)


@main.group()
def member() -> None:
    """Org memberships."""


@member.command("add")
@click.argument("org_slug", metavar="ORG")
@click.argument("email")
@click.option("--role", type=click.Choice(["admin", "member"]), required=True)
@one_line_errors
def member_add(org_slug: str, email: str, role: str) -> None:
    """Add EMAIL to ORG with a role (or change their role)."""
    from app.identity import service as identity

    with unit_of_work() as s:
        identity.add_member(s, cli_context(), identity.get_org(s, org_slug), identity.get_user_by_email(s, email), role)


@main.group()
def token() -> None:
    """API tokens."""


@token.command("create")
@click.argument("email")
@click.option("--name", default="cli")
@click.option("--expires-in-days", type=click.IntRange(1, 3650), default=None)
@one_line_errors
def token_create(email: str, name: str, expires_in_days: int | None) -> None:
    """Create an API token for EMAIL; prints only the token."""
    from datetime import timedelta

    from app.db import utcnow
    from app.identity import service as identity

    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    with unit_of_work() as s:
        _tok, raw = identity.create_token(s, cli_context(), identity.get_user_by_email(s, email), name, expires)
    click.echo(raw)


@token.command("revoke")
@click.argument("email")
@click.argument("token_id")
@one_line_errors
def token_revoke(email: str, token_id: str) -> None:
    """Revoke the token TOKEN_ID of EMAIL."""
    from app.identity import service as identity

    with unit_of_work() as s:
        identity.revoke_token(s, cli_context(), identity.get_user_by_email(s, email), token_id)


# audit -------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit log."""


@audit.command("verify")
@click.argument("org_slug", metavar="[ORG]", required=False)
@one_line_errors
def audit_verify(org_slug: str | None) -> None:
    """Check the hash chains (every org's and the instance's, or one ORG's)."""
    from app.audit import service as audit_service
    from app.identity import service as identity

    failed = 0
    with unit_of_work() as s:
        chain_ids = [identity.get_org(s, org_slug).id] if org_slug else audit_service.chains(s)
        for chain in chain_ids:
            report = audit_service.verify_chain(s, chain)
            status = "ok" if report.ok else "TAMPERED"
            click.echo(f"{chain}: {report.events} events, {status}")
            for problem in report.problems:
                click.echo(f"  {problem}")
            failed += 0 if report.ok else 1
    if failed:
        _fail(f"{failed} audit chain(s) failed verification")


# dev ---------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5080, show_default=True, type=int)
@click.option("--instance", "instance_dir", default="instance", show_default=True, type=click.Path(path_type=Path))
@one_line_errors
def dev(host: str, port: int, instance_dir: Path) -> None:
    """Run everything in one process on embedded defaults (SQLite, in-process Redis, a worker thread)."""
    from app.devserver import run

    run(host=host, port=port, instance_dir=instance_dir)


if __name__ == "__main__":  # pragma: no cover
    main()
