"""Alembic environment: the URL comes from Latchkey settings (or the caller's config)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

import app.models  # noqa: F401  (registers every table)
from app.db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from app.config import load_settings

        url = load_settings().database_url
    return str(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    if connection.dialect.name == "postgresql":
        # Fail fast instead of queueing behind application locks during a deploy.
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text("SET statement_timeout = '15min'"))
        # SET is session-wide; end the implicit transaction so Alembic owns the next one.
        connection.commit()
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch migrations recreate tables that others reference; SQLite checks foreign keys on
        # the DROP unless they are off, and the pragma only works outside a transaction. They
        # are checked in full (PRAGMA foreign_key_check) before the migration commits.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # One transaction for the whole run: a refused step leaves the schema where it was.
        transaction_per_migration=False,
        # SQLite DDL is transactional too (our engine issues BEGIN IMMEDIATE itself).
        transactional_ddl=True,
    )
    try:
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration refused: {len(broken)} foreign key reference(s) would break")
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
