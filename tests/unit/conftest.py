"""Unit-lane fixtures: a session whose work is rolled back after each test, never truncated."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session

from app.db import Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate
from app.models import Org
from app.secrets.keyring import Keyring, PublicKeySet
from tests.support.factories import CTX


@pytest.fixture(scope="session")
def unit_db(database_url: str) -> Iterator[Database]:
    """The test database without the app: nothing is sent after a commit on the unit lane."""
    database = Database()
    database.configure(database_url)
    yield database
    database.dispose()


@pytest.fixture
def db_session(unit_db: Database, request: pytest.FixtureRequest) -> Iterator[Session]:
    """A session inside one outer transaction that is rolled back when the test ends.

    SQLAlchemy 2's "join into an external transaction" recipe: the session runs on a
    connection that already has a transaction open, and ``join_transaction_mode=
    "create_savepoint"`` turns its own ``commit()``/``rollback()`` into RELEASE/ROLLBACK TO
    SAVEPOINT, so a service (or a test) may commit and nothing still reaches the database.
    SQLite needs pysqlite's own transaction handling off for SAVEPOINT to work;
    ``app.db.make_engine`` already does that (``isolation_level=None`` and an explicit
    ``BEGIN IMMEDIATE``), which also means the outer transaction holds SQLite's write lock:
    a test on this session must not write through another connection (the app, a worker).
    It is a plain ``Session``, not the app's ``UnitOfWork``: what a service queues for after
    the commit (jobs, invalidations) stays in ``session.info``, where a test can look at it.
    """
    if "app" in request.fixturenames:
        # The app commits through its own connections, which this rollback would not undo
        # (and which SQLite's held write lock would block).
        pytest.fail("db_session is for service-level tests: use app/client (emptied tables) or db_session, not both")
    assert unit_db.engine is not None
    with unit_db.engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def org_row(db_session: Session) -> Org:
    """An org made on the rolled-back session."""
    return identity.create_org(db_session, CTX, OrgCreate(slug="unit-org", name="Unit Org"))


@pytest.fixture
def other_org_row(db_session: Session) -> Org:
    """A second org: its rows must stay invisible from :func:`org_row`."""
    return identity.create_org(db_session, CTX, OrgCreate(slug="unit-other", name="Unit Other"))


@pytest.fixture
def public_keys(keyring: Keyring) -> PublicKeySet:
    return keyring.public_set()
