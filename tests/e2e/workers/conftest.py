"""Fixtures of the worker tests: a database holding legacy rows, expanded but not contracted."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import migrate
from app.db import Database
from tests.support import backends
from tests.support.legacy_data import insert_legacy


@pytest.fixture
def legacy_url(tmp_path: Path) -> Iterator[str]:
    """A database built at revision 0001 with legacy rows, then expanded (not contracted)."""
    name = f"latchkey_backfill_{backends.worker_suffix()}_{uuid.uuid4().hex[:10]}"
    pg = backends.fresh_postgres_database(name)
    url = pg or f"sqlite:///{tmp_path / 'legacy.db'}"
    try:
        migrate.upgrade(url, "0001")
        insert_legacy(url)
        migrate.upgrade(url, migrate.PRE_CONTRACT)
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
