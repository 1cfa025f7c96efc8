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

from app import extensions
from app.config import ConfigError, Settings, load_settings
from app.context import cli_context
from app.db import Database
from app.errors import LatchkeyError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print ``latchkey: MESSAGE`` on stderr and exit with ``code``."""
    click.echo(f"latchkey: {message}", err=True)
    sys.exit(code)


def one_line_errors(fn: F) -> F:
    """Turn expected failures into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), 2)
        except LatchkeyError as exc:
            fail(exc.detail)
        except Exception as exc:
            from app.secrets.keyring import KeyringError

            if isinstance(exc, KeyringError):
                fail(str(exc))
            raise

    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return load_settings()


@contextmanager
def open_database(cfg: Settings) -> Iterator[Database]:
    """The database, sending what a command's transaction queues (jobs, invalidations) on commit."""
    import redis

    from app.jobs.service import Publisher
    from app.secrets.invalidation import Invalidator
    from app.worker import make_celery

    db = Database()
    db.configure(cfg.database_url)
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    db.on_commit("invalidate", Invalidator.for_settings(client, db, cfg).flush)
    db.on_commit("publish", Publisher(make_celery(cfg), db).publish)
    try:
        yield db
    finally:
        client.close()
        db.dispose()


@contextmanager
def unit_of_work() -> Iterator[Session]:
    with open_database(settings()) as db, db.session() as s:
        yield s


@click.group()
@click.version_option(package_name="latchkey")
def main() -> None:
    """Latchkey: managed secrets for AI agents and MCP servers."""


# db ----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Schema migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", required=False)
@one_line_errors
def db_upgrade(revision: str | None) -> None:
    """Upgrade the schema to REVISION; without one, as far as the database may go (the release step).

    Without REVISION every expand step is applied, and the contract too once the backfill has been
    verified; before that the schema stays expanded and one line names the next step (exit 0), so a
    release deploys while legacy data waits for its backfill.
    """
    from app import migrate

    if revision is not None:
        try:
            migrate.upgrade(settings().database_url, revision)
        except RuntimeError as exc:  # the contract refusing before a verification says why
            fail(str(exc))
        return
    waits = migrate.release(settings().database_url)
    if waits is not None:
        click.echo(f"latchkey: expanded to {migrate.PRE_CONTRACT}; the contract waits: {waits.split(': ', 1)[-1]}")


@db.command("downgrade")
@click.argument("revision")
@one_line_errors
def db_downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (e.g. 0001, the legacy schema)."""
    from app import migrate

    try:
        migrate.downgrade(settings().database_url, revision)
    except RuntimeError as exc:  # a migration refusing to lose data says why
        fail(str(exc))


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


RESEAL_HINT = "queue the re-seal later with: POST /api/v1/admin/keys/reseal (operator token)"


def _keyring_file() -> Path:
    path = settings().private_keys_file
    if path is None:
        fail("set LATCHKEY_PRIVATE_KEYS_FILE to the keyring file (the workers' keyring)")
    assert path is not None
    return Path(path)


@keys.command("rotate")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=None, help="Rows per re-seal batch (default 500).")
@one_line_errors
def keys_rotate(batch_size: int | None) -> None:
    """Add a new current key to the keyring file and queue the re-seal job.

    Prints the new public key set (for LATCHKEY_PUBLIC_KEYS) on stdout; the job id on stderr.
    """
    from app.errors import BrokerUnavailableError
    from app.jobs import service as jobs
    from app.jobs.names import TaskName
    from app.secrets.keyring import Keyring

    path = _keyring_file()
    ring = Keyring.load(path)
    kid = ring.add_key()
    ring.write(path, overwrite=True)
    click.echo(ring.public_set().dumps())
    click.echo(f"latchkey: added key {kid}; give the line above to the web tier as LATCHKEY_PUBLIC_KEYS", err=True)

    try:
        with open_database(settings()) as database, database.session() as s:
            job_id = jobs.create_job(
                s,
                cli_context(),
                org_id=None,
                kind=TaskName.RESEAL_SECRETS,
                params={"batch_size": batch_size} if batch_size else {},
            ).id
    except BrokerUnavailableError:
        fail(f"key {kid} was added, but the job queue is unavailable; {RESEAL_HINT}")
    click.echo(f"latchkey: re-seal job {job_id} queued", err=True)


@keys.command("retire")
@click.argument("key_id")
@one_line_errors
def keys_retire(key_id: str) -> None:
    """Remove KEY_ID from the keyring file once no ciphertext uses it; prints the new public set."""
    from app.secrets import rotation
    from app.secrets.keyring import Keyring, PublicKeySet

    path = _keyring_file()
    ring = Keyring.load(path)
    ring.private_key(key_id)  # unknown kid: a one-line KeyringError
    if key_id == ring.current_kid:
        fail(f"refusing to retire {key_id}: it is the current (newest) key; rotate first")
    web_keys = settings().public_keys
    if web_keys and PublicKeySet.parse(web_keys).current.kid == key_id:
        fail(f"refusing to retire {key_id}: LATCHKEY_PUBLIC_KEYS still seals new values to it")
    with unit_of_work() as s:
        using = rotation.count_using(s, key_id)
    if using:
        where = ", ".join(f"{n} in {col}" for col, n in using.items())
        fail(
            f"refusing to retire {key_id}: {sum(using.values())} sealed value(s) still use it ({where}); {RESEAL_HINT}"
        )
    ring.remove_key(key_id)
    ring.write(path, overwrite=True)
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
    from app.identity.schemas import OrgCreate
    from app.schemas import validated

    data = validated(OrgCreate, {"slug": slug, "name": name})
    with unit_of_work() as s:
        created = identity.create_org(s, cli_context(), data)
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
    from app.identity.schemas import UserCreate
    from app.schemas import validated

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None
    # An empty line on stdin means no password, as it always has: a token-only user.
    data = validated(
        UserCreate, {"email": email, "password": password, "operator": operator}, blank_is_none=("password",)
    )
    with unit_of_work() as s:
        created = identity.create_user(s, cli_context(), data)
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
    from app.access import OrgAccess
    from app.identity import service as identity
    from app.models import Role

    with unit_of_work() as s:
        # Whoever runs the CLI runs the instance: they act with an org admin's rights.
        access = OrgAccess.system(identity.get_org(s, org_slug))
        identity.add_member(s, cli_context(), access, identity.get_user_by_email(s, email), Role(role))


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
    from app.identity.schemas import TokenCreate
    from app.schemas import validated

    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    data = validated(TokenCreate, {"name": name, "expires_at": expires})
    with unit_of_work() as s:
        _tok, raw = identity.create_token(s, cli_context(), identity.get_user_by_email(s, email), data)
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
        fail(f"{failed} audit chain(s) failed verification")


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


# The extensions' command groups (app/extensions.py), e.g. `latchkey backfill`.
for _ext in extensions.modules("cli"):
    main.add_command(_ext.group)


if __name__ == "__main__":  # pragma: no cover
    main()
