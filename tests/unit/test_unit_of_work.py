"""The unit of work: what a transaction queues is sent once it commits, in order, never on rollback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app.db import AFTER_COMMIT, Database, UnitOfWorkError, defer


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database()
    db.configure(f"sqlite:///{tmp_path / 'uow.db'}")
    with db.session() as s:
        s.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    yield db
    db.dispose()


def test_queued_work_is_sent_after_commit_invalidations_first(database: Database) -> None:
    sent: list[tuple[str, Any, int]] = []

    def sender(kind: str) -> Any:
        def send(items: list[Any]) -> None:
            # What a sender is handed is already committed: another session sees the row.
            with database.session() as other:
                rows = int(other.execute(text("SELECT count(*) FROM t")).scalar_one())
            sent.extend((kind, item, rows) for item in items)

        return send

    for kind in AFTER_COMMIT:
        database.on_commit(kind, sender(kind))
    with database.session() as s:
        s.execute(text("INSERT INTO t (id) VALUES (1)"))
        defer(s, "publish", "job-1")
        defer(s, "invalidate", "secret-1")
        assert sent == []  # nothing leaves before the commit
    assert sent == [("invalidate", "secret-1", 1), ("publish", "job-1", 1)]


def test_rolled_back_work_is_never_sent(database: Database) -> None:
    sent: list[tuple[str, Any]] = []
    for kind in AFTER_COMMIT:
        database.on_commit(kind, lambda items, kind=kind: sent.extend((kind, i) for i in items))

    def abandoned() -> None:
        with database.session() as s:
            defer(s, "publish", "job-1")
            raise RuntimeError("abandon")

    with pytest.raises(RuntimeError, match="abandon"):
        abandoned()
    with database.session() as s:  # the same pool, a new transaction: the old queue is gone
        s.execute(text("SELECT 1"))
    assert sent == []


def test_work_queued_where_nothing_can_send_it_is_an_error_not_a_silent_delay(database: Database) -> None:
    with pytest.raises(UnitOfWorkError, match="publish"), database.session() as s:
        defer(s, "publish", "job-1")


def test_unknown_kinds_are_refused(database: Database) -> None:
    with database.session() as s, pytest.raises(ValueError, match="unknown"):
        defer(s, "email", "x")
    with pytest.raises(ValueError, match="unknown"):
        database.on_commit("email", lambda items: None)
