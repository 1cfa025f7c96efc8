"""Shared fixtures: a migrated database, Redis, an app, and factories for orgs and users."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher, profiles
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient

from app import migrate
from app.config import Settings, load_settings
from app.db import Base, Database
from app.factory import create_app
from app.identity import service as identity_service
from app.secrets.keyring import Keyring
from app.web.pages import REVEAL_HIDE_SECONDS
from tests.support import backends
from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer
from tests.support.processes import drop_queue, worker_process
from tests.support.web import HIDE_SECONDS

# Passwords are hashed with the real argon2id, at the library's cheapest parameters, as Django's
# test settings swap in a fast hasher: production's RFC 9106 profile costs ~150 ms a hash, a
# quarter of the functional lane's CPU. An argon2 hash carries its parameters, so what is hashed
# here verifies the same way; processes the tests spawn (gunicorn, `latchkey dev`) keep production's.
identity_service._hasher = PasswordHasher.from_parameters(profiles.CHEAPEST)

# Tables the tests never empty: Alembic's bookkeeping.
KEEP = {"alembic_version"}


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latchkey")


@pytest.fixture(scope="session")
def database_url(tmp_root: Path) -> Iterator[str]:
    url = backends.database_url(tmp_root)
    migrate.upgrade(url, "head")
    yield url
    if url.startswith("postgresql") and backends.session_database_name() in url:
        backends.drop_postgres_database(backends.session_database_name())


@pytest.fixture(scope="session")
def redis_url() -> str:
    return backends.redis_url()


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str | None]:
    """This session's broker: None for the Redis, or a RabbitMQ virtual host of its own (deleted after)."""
    url = backends.broker_url()
    yield url
    if url is not None and backends.on_rabbitmq() and backends.session_vhost_name() in url:
        backends.delete_vhost(backends.session_vhost_name())


@pytest.fixture(scope="session")
def keyring_path(tmp_root: Path) -> Path:
    path = tmp_root / "keyring.json"
    Keyring.generate().write(path)
    return path


@pytest.fixture(scope="session")
def keyring(keyring_path: Path) -> Keyring:
    return Keyring.load(keyring_path)


GATEWAY_TOKEN = "test-gateway-token-" + "g" * 24


@pytest.fixture(scope="session")
def llm_server() -> Iterator[LlmTestServer]:
    """The model-API stand-in (OpenAI, Anthropic, gateway routes), also the worker's gateway base URL."""
    with LlmTestServer() as server:
        yield server


@pytest.fixture
def llm(llm_server: LlmTestServer) -> Iterator[LlmTestServer]:
    """The model stand-in, reset (no recorded calls, no required key) before and after the test."""
    llm_server.reset()
    llm_server.api_key = None
    yield llm_server
    llm_server.reset()


@pytest.fixture(scope="session")
def ui_port() -> int:
    """The port the browser tests' live server listens on: this deployment's public URL (where
    OAuth authorization servers send the browser back), so it is known before the settings."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    redis_url: str,
    broker_url: str | None,
    keyring: Keyring,
    keyring_path: Path,
    llm_server: LlmTestServer,
    ui_port: int,
) -> Settings:
    return load_settings(
        {},
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        broker_url=broker_url,
        secret_key="test-secret-key-" + "x" * 32,
        public_keys=keyring.public_set().dumps(),
        private_keys_file=keyring_path,
        log_level="DEBUG",
        # A queue of this session's own, so concurrent test runs on one Redis never share jobs.
        queue=f"latchkey-test-{os.getpid()}",
        # The MCP test servers and model stand-ins listen on loopback over plain http.
        egress_allow_private=True,
        egress_allow_http_hosts="127.0.0.1,localhost",
        mcp_timeout_seconds=2.0,
        public_url=f"http://127.0.0.1:{ui_port}",
        gateway_token=GATEWAY_TOKEN,
        ai_gateway_base_url=llm_server.url,
    )


@pytest.fixture(scope="session")
def app(settings: Settings) -> Iterator[Flask]:
    application = create_app(settings)
    yield application
    application.extensions["latchkey.db"].dispose()


@pytest.fixture(scope="session")
def db(app: Flask) -> Database:
    """The app's own database: what a test's transaction queues is sent on commit, as in production."""
    database: Database = app.extensions["latchkey.db"]
    return database


def empty_tables(database: Database) -> None:
    """Empty every table. A real worker may still be finishing a job the test queued: PostgreSQL
    may then pick the TRUNCATE as a deadlock's victim, and it is tried again once the job is done."""
    engine = database.engine
    assert engine is not None
    tables = [t for t in reversed(Base.metadata.sorted_tables) if t.name not in KEEP]
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.text("TRUNCATE " + ", ".join(f'"{t.name}"' for t in tables) + " CASCADE"))
                else:
                    for t in tables:
                        conn.execute(t.delete())
            return
        except sa.exc.OperationalError as exc:
            if "deadlock detected" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


@pytest.fixture(autouse=True)
def _clean_database(request: pytest.FixtureRequest) -> Iterator[None]:
    # Resolved before the test: pytest forbids requesting new fixtures during teardown. A test
    # marked shared_data reads rows a module-scoped fixture made (and empties at its teardown).
    # A test on the rolled-back ``db_session`` (tests/unit) leaves nothing behind to empty.
    names = set(request.fixturenames)
    uses_db = {"db", "app"} & names and "db_session" not in names
    shared = request.node.get_closest_marker("shared_data") is not None
    database = request.getfixturevalue("db") if uses_db and not shared else None
    yield
    if database is not None:
        empty_tables(database)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def ui_app(settings: Settings) -> Iterator[Flask]:
    """The app the UI tests use (test client and browser alike), with a short reveal hide delay."""
    application = create_app(settings)
    application.config[REVEAL_HIDE_SECONDS] = HIDE_SECONDS
    yield application
    application.extensions["latchkey.db"].dispose()


@pytest.fixture
def ui_client(ui_app: Flask) -> FlaskClient:
    return ui_app.test_client()


@pytest.fixture
def factory(db: Database, client: FlaskClient) -> Factory:
    return Factory(db, client)


@pytest.fixture
def org(factory: Factory) -> str:
    """A fresh org (slug ``org-<n>``)."""
    return factory.org()


@pytest.fixture
def admin(factory: Factory, org: str) -> Caller:
    """An admin of ``org`` with an API token."""
    return factory.user(org, "admin")


@pytest.fixture
def member(factory: Factory, org: str) -> Caller:
    """A member (not admin) of ``org`` with an API token."""
    return factory.user(org, "member")


@pytest.fixture
def dialect(db: Database) -> str:
    assert db.engine is not None
    return db.engine.dialect.name


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every log line any logger emits during the test, formatted (for leak scans)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))
            if record.exc_info:
                lines.append(logging.Formatter().formatException(record.exc_info))

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture(scope="session")
def worker_log(tmp_root: Path) -> Path:
    """Where the session worker process writes its log (tests may read it)."""
    return tmp_root / "worker.log"


@pytest.fixture(scope="session")
def worker(settings: Settings, app: Any, redis_url: str, worker_log: Path) -> Iterator[Celery]:
    """One real worker process for the whole session, on this session's queue."""
    with worker_process(settings, worker_log) as producer:
        yield producer
    drop_queue(settings, settings.queue)


TESTS = Path(__file__).resolve().parent
LANES = ("unit", "functional", "e2e")


def _lane(item: pytest.Item) -> str:
    return item.path.relative_to(TESTS).parts[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Each test carries its lane's marker, so `-m "not e2e"` selects the in-process lanes.
    for item in items:
        if _lane(item) in LANES:
            item.add_marker(_lane(item))
    # Lanes run in order, e2e last (on every xdist worker too): once an e2e test has started the
    # session's worker process, it consumes every job a later test queues, and a test-client
    # test that queued one (an agent run, a validation) would then race that job with the
    # truncation after it.
    items.sort(key=lambda item: LANES.index(_lane(item)) if _lane(item) in LANES else -1)


def pytest_report_header(config: Any) -> list[str]:
    return [
        "latchkey backends: "
        + (
            "SQLite + fakeredis (forced)"
            if backends.forced_sqlite()
            else "PostgreSQL/Redis when reachable, else SQLite/fakeredis"
        )
        + f"; broker: {backends.broker_kind()}"
    ]
