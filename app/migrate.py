"""Alembic, driven from code: `latchkey db upgrade|downgrade` and the tests use this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# The last expand revision (every table and column the code needs, legacy columns still
# there: 0007-0009 and 0011-0012 and 0014 branch from 0005, see migrations/versions/0010, 0013 and 0015), and the
# one that drops them.
PRE_CONTRACT = "0014"
CONTRACT = "0006"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def contract_waits(database_url: str) -> str | None:
    """Why the contract (0006) may not run on this database yet, in its own words; None when it may."""
    from app.db import make_engine

    gate = ScriptDirectory.from_config(alembic_config(database_url)).get_revision(CONTRACT).module.check_gate
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            gate(conn)
    except RuntimeError as exc:
        return str(exc)
    finally:
        engine.dispose()
    return None


def release(database_url: str) -> str | None:
    """The release step (``latchkey db upgrade``, the Procfile's): as far as this database may go.

    Every expand step always; then the rest to head, unless the contract still waits for the
    backfill's verification: the schema then stays expanded (the running release needs nothing
    more) and the reason is returned, naming the next step. The contract itself still refuses
    to run before a verification passed (``latchkey db upgrade head`` says why).
    """
    if CONTRACT not in _applied(database_url):
        upgrade(database_url, PRE_CONTRACT)
        reason = contract_waits(database_url)
        if reason is not None:
            return reason
    upgrade(database_url, "head")
    return None


def _applied(database_url: str) -> set[str]:
    """Every revision applied (the heads and all below them)."""
    script = ScriptDirectory.from_config(alembic_config(database_url))
    found: set[str] = set()
    for head in current(database_url):
        found.update(rev.revision for rev in script.iterate_revisions(head, "base"))
    return found


def downgrade(database_url: str, revision: str) -> None:
    cfg = alembic_config(database_url)
    command.downgrade(cfg, revision)
    if revision == PRE_CONTRACT and current(database_url) - {PRE_CONTRACT}:
        # The last expand step is not below the contract (they are two branches of 0005), so reaching
        # it leaves 0006 (and the merge 0010) applied: undo the contract branch down to 0005 too, which
        # is what "back to the expand state" means.
        command.downgrade(cfg, "contract@0005")


def current(database_url: str) -> set[str]:
    """The revisions the database is at (one per branch head)."""
    from alembic.runtime.migration import MigrationContext

    from app.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def heads(database_url: str = "sqlite://") -> list[str]:
    return list(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())
