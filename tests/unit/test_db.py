"""The unit lane's rolled-back session: work done on it, committed or not, never reaches the database."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate
from app.models import Org
from tests.support.factories import CTX

SLUG = "savepoint-probe"


def _orgs_seen_elsewhere(db: Database) -> int:
    # A plain DB-API connection: SQLAlchemy's would BEGIN IMMEDIATE on SQLite and wait for the
    # write lock the test's outer transaction holds; a bare read does not (WAL).
    assert db.engine is not None
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SELECT count(*) FROM orgs WHERE slug = '" + SLUG + "'")
        return int(cur.fetchone()[0])
    finally:
        raw.close()


@pytest.mark.parametrize("attempt", [1, 2])
def test_a_committed_write_is_gone_after_the_test(db_session: Session, unit_db: Database, attempt: int) -> None:
    # Both attempts create the same slug: the second one only succeeds if the first was rolled back.
    identity.create_org(db_session, CTX, OrgCreate(slug=SLUG, name="Probe"))
    db_session.commit()
    assert db_session.scalar(select(Org.name).where(Org.slug == SLUG)) == "Probe"
    # Released savepoint, open outer transaction: no other connection sees the row.
    assert _orgs_seen_elsewhere(unit_db) == 0


def test_a_rollback_inside_the_test_keeps_the_session_usable(db_session: Session) -> None:
    identity.create_org(db_session, CTX, OrgCreate(slug=SLUG, name="Probe"))
    db_session.rollback()
    assert db_session.scalar(select(Org.id).where(Org.slug == SLUG)) is None
    identity.create_org(db_session, CTX, OrgCreate(slug=SLUG, name="Again"))
    db_session.flush()
    assert db_session.scalar(select(Org.name).where(Org.slug == SLUG)) == "Again"
