"""Database plumbing: declarative base, engine, sessions, shared column types."""

from __future__ import annotations

import json
import os
import secrets as _random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import JSON, DateTime, Engine, MetaData, Table, bindparam, create_engine, event, insert, text, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so Alembic migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


T = TypeVar("T")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A UUIDv7 string: time-ordered, so ids sort by creation and index well."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64
    value |= (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def random_token(nbytes: int = 32) -> str:
    return _random.token_urlsafe(nbytes)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine with the per-backend settings Latchkey relies on."""
    # Errors and SQL logs never show bound parameters (they may hold sealed values).
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        # isolation_level=None stops pysqlite's own implicit BEGIN; we issue BEGIN IMMEDIATE
        # below so concurrent writers queue on the lock instead of failing mid-transaction.
        kwargs.setdefault("connect_args", {"timeout": 15, "isolation_level": None})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # Foreign keys are what keep cross-org references out; SQLite needs them switched on.
            cur.execute("PRAGMA foreign_keys=ON")
            if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=15000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


AFTER_COMMIT = ("invalidate", "publish")
"""What a transaction may queue for after its commit, in the order it is sent: cache
invalidations before job messages, so a job queued with a change never reads the value
that change replaced."""


class UnitOfWorkError(RuntimeError):
    """Work was queued in a session of a database that has nowhere to send it (a wiring bug)."""


def defer(session: Session, kind: str, item: Any) -> None:
    """Queue ``item`` to be sent once ``session`` commits (dropped if it rolls back)."""
    if kind not in AFTER_COMMIT:
        raise ValueError(f"unknown after-commit kind {kind!r}")
    session.info.setdefault(kind, []).append(item)


class UnitOfWork(Session):
    """A session that sends what its transaction queued (:func:`defer`) once it has committed.

    Every edge (API, UI, CLI, task) just commits; nothing is sent for a transaction that
    rolled back, and nothing is sent before the rows it refers to are visible.
    """

    def commit(self) -> None:
        super().commit()
        work = {kind: self.info.pop(kind) for kind in AFTER_COMMIT if self.info.get(kind)}
        if work:
            database: Database = self.info["latchkey.database"]
            database.after_commit(work)


class Database:
    """Owns the engine, the session factory and what is sent after each commit."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.sessionmaker: sessionmaker[Session] | None = None
        self._senders: dict[str, Callable[[list[Any]], None]] = {}
        self._autocommit: Engine | None = None

    def configure(self, url: str, **kwargs: Any) -> None:
        self.engine = make_engine(url, **kwargs)
        self._autocommit = None
        self.sessionmaker = sessionmaker(
            self.engine, class_=UnitOfWork, expire_on_commit=False, info={"latchkey.database": self}
        )

    def on_commit(self, kind: str, send: Callable[[list[Any]], None]) -> None:
        """Bind who sends ``kind`` items after a commit (the invalidator, the job publisher)."""
        if kind not in AFTER_COMMIT:
            raise ValueError(f"unknown after-commit kind {kind!r}")
        self._senders[kind] = send

    def after_commit(self, work: dict[str, list[Any]]) -> None:
        for kind in AFTER_COMMIT:
            items = work.get(kind)
            if not items:
                continue
            send = self._senders.get(kind)
            if send is None:
                raise UnitOfWorkError(f"{len(items)} {kind} item(s) were queued, but this database sends no {kind}")
            send(items)

    def autocommit(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)``: ONE statement that is atomic on its own and safe to repeat.

        For a worker's job transitions (claim, lease renewal, release, outcome: two or three
        per job). On PostgreSQL the statement runs on an autocommit connection of a pool of its
        own without a pre-ping: no ping, BEGIN or COMMIT round trip around it, one round trip in
        all. A connection found dead instead (the server restarted since it was pooled) is
        discarded and ``fn`` is run once more on a new one, which is why ``fn`` must be safe to
        repeat (a statement may have been applied just before its connection broke). Anything
        needing more than one statement uses :meth:`session`. SQLite (in process) gets an
        ordinary session.
        """
        assert self.sessionmaker is not None and self.engine is not None, "Database is not configured"
        if self.engine.dialect.name != "postgresql":
            with self.session() as s:
                return fn(s)
        if self._autocommit is None:
            self._autocommit = make_engine(
                self.engine.url.render_as_string(hide_password=False),
                pool_pre_ping=False,
                isolation_level="AUTOCOMMIT",
                pool_size=4,
                max_overflow=8,
            )
        try:
            with self._unit(self.sessionmaker(bind=self._autocommit)) as s:
                return fn(s)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self._unit(self.sessionmaker(bind=self._autocommit)) as s:
            return fn(s)

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self._autocommit is not None:
            self._autocommit.dispose()

    def session(self) -> AbstractContextManager[Session]:
        """One unit of work: commit (then send what it queued) on success, roll back on any error."""
        assert self.sessionmaker is not None, "Database is not configured"
        return self._unit(self.sessionmaker())

    @staticmethod
    @contextmanager
    def _unit(session: Session) -> Iterator[Session]:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()


# A batch job's checkpoint, called inside each batch's transaction with (the batch's session, the
# running totals to keep, rows done, rows planned or None): app/tasks/split.py's Checkpoint.
BatchCheckpoint = Callable[[Session, dict[str, Any] | None, int, int | None], None]


# Below this many rows the bulk helpers use plain statements: COPY and a scratch table cost
# more than they save on a handful of rows (an API request's audit event, say).
COPY_THRESHOLD = 50


def _copy_rows(session: Session, target: str, table: Table, names: list[str], rows: list[dict[str, Any]]) -> None:
    """``COPY target (names) FROM STDIN`` on the session's own connection (same transaction).

    psycopg's COPY adapts str, bytes, numbers and datetimes; the JSON columns (``table``'s types
    say which) take their text. Picked once per call, not tested per value: a backfill batch
    copies hundreds of thousands of values.
    """
    preparer = session.get_bind().dialect.identifier_preparer
    cols = ", ".join(preparer.quote(n) for n in names)
    raw = session.connection().connection.driver_connection
    assert raw is not None
    json_at = [i for i, n in enumerate(names) if isinstance(table.c[n].type, JSON)]
    with raw.cursor() as cur, cur.copy(f"COPY {preparer.quote(target)} ({cols}) FROM STDIN") as copy:
        for row in rows:
            values = [row[n] for n in names]
            for i in json_at:
                if values[i] is not None:
                    values[i] = json.dumps(values[i])
            copy.write_row(values)


def bulk_insert(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT many rows (every row with the same keys) in one go.

    PostgreSQL: one COPY (an executemany below COPY_THRESHOLD rows); SQLite (in process, no
    round trips): an executemany. Used by batch
    jobs (backfill, the audit events of a batch), where a statement per row would cost more
    than the work itself.
    """
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_THRESHOLD:
        _copy_rows(session, table.name, table, list(rows[0]), rows)
    else:
        session.execute(insert(table), rows)


def bulk_update(session: Session, table: Table, rows: list[dict[str, Any]], key: str = "id") -> None:
    """UPDATE many rows by ``key``, each with its own values (every row with the same keys).

    PostgreSQL: COPY into a temporary table, then one ``UPDATE ... FROM`` it. SQLite, and
    fewer than COPY_THRESHOLD rows: an executemany of the same UPDATE.
    """
    if not rows:
        return
    names = list(rows[0])
    changed = [n for n in names if n != key]
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql" or len(rows) < COPY_THRESHOLD:
        stmt = (
            update(table).where(table.c[key] == bindparam(f"k_{key}")).values({n: bindparam(f"k_{n}") for n in changed})
        )
        session.execute(stmt, [{f"k_{n}": row[n] for n in names} for row in rows])
        return
    q = dialect.identifier_preparer.quote
    scratch = f"_bulk_{table.name}"
    columns = ", ".join(f"{q(n)} {table.c[n].type.compile(dialect=dialect)}" for n in names)
    session.execute(text(f"CREATE TEMPORARY TABLE {q(scratch)} ({columns}) ON COMMIT DROP"))
    _copy_rows(session, scratch, table, names, rows)
    assignments = ", ".join(f"{q(n)} = b.{q(n)}" for n in changed)
    # Only our own quoted table and column names are interpolated; every value goes via COPY.
    sql = f"UPDATE {q(table.name)} AS t SET {assignments} FROM {q(scratch)} AS b WHERE t.{q(key)} = b.{q(key)}"  # noqa: S608
    session.execute(text(sql))
    session.execute(text(f"DROP TABLE {q(scratch)}"))


def updated(session: Session, stmt: Any) -> int:
    """Run an UPDATE (or DELETE); how many rows it changed."""
    return int(getattr(session.execute(stmt), "rowcount", 0) or 0)


def flush_or_raise(session: Session, error: Exception) -> None:
    """Flush; a constraint violation raises ``error`` instead.

    For the race where a concurrent request took a name, or referenced a row, after our check.
    The transaction cannot be used after that (PostgreSQL aborts it): every caller lets the error
    end the request, or rolls back first (app/web/providers.py). There is no savepoint around the
    flush: ``begin_nested()`` flushes before its SAVEPOINT, so one never covered it (none was
    ever sent).
    """
    try:
        session.flush()
    except IntegrityError:
        raise error from None


@event.listens_for(Session, "after_rollback")
def _drop_publications(session: Session) -> None:
    # Jobs and changes of a rolled-back transaction do not exist: never send them.
    for kind in AFTER_COMMIT:
        session.info.pop(kind, None)
