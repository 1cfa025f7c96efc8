"""Which database, Redis and broker the tests use: the real services when reachable, else embedded ones.

``LATCHKEY_TEST_DATABASE_URL`` / ``LATCHKEY_TEST_REDIS_URL`` pick them explicitly;
``LATCHKEY_TEST_BACKEND=sqlite`` forces SQLite + fakeredis (the newcomer's machine).
The broker is the Redis unless ``LATCHKEY_TEST_BROKER=rabbitmq`` (``manage.py test --broker
rabbitmq``): then the local RabbitMQ, each session in a virtual host of its own, created with
``rabbitmqctl`` and deleted at the end; ``LATCHKEY_TEST_BROKER_URL`` names a broker to use as is.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_USER = "guest"
VHOST_PREFIX = "latchkey_test_"
# Closed ports: a broker (of the lane's kind) that refuses every connection.
CLOSED_BROKERS = {"redis": "redis://127.0.0.1:1/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:1//"}


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def forced_sqlite() -> bool:
    return os.environ.get("LATCHKEY_TEST_BACKEND", "").lower() == "sqlite"


def worker_suffix() -> str:
    # pytest-xdist runs several sessions at once; each gets its own database.
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


def fresh_postgres_database(name: str) -> str | None:
    """Drop and create database ``name``; its URL, or None when PostgreSQL is not reachable."""
    if forced_sqlite() or not _reachable(PG_HOST, PG_PORT):
        return None
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"


def drop_postgres_database(name: str) -> None:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def session_database_name() -> str:
    # One database per test session (and xdist worker), so concurrent runs never collide.
    return f"latchkey_test_{worker_suffix()}_{os.getpid()}"


def drop_stale_databases() -> None:
    """Drop test databases left behind by sessions whose process is gone."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            names = conn.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'latchkey_test_%'"))
            for (name,) in names.all():
                pid = name.rsplit("_", 1)[-1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def database_url(tmp_dir: Path) -> str:
    explicit = os.environ.get("LATCHKEY_TEST_DATABASE_URL")
    if explicit:
        return explicit
    pg = fresh_postgres_database(session_database_name())
    if pg:
        drop_stale_databases()
    return pg or f"sqlite:///{tmp_dir / 'test.db'}"


def worker_index() -> int:
    """0 without xdist, else N for worker ``gwN``."""
    suffix = worker_suffix()
    return int(suffix[2:]) if suffix.startswith("gw") else 0


def redis_url() -> str:
    """The Redis (db) of this session: each xdist worker gets a db of its own.

    Sign-in limits (per address: always 127.0.0.1 here), Celery's control and event traffic and
    the leak scans all see the whole db, so two workers must never share one. An explicit
    ``LATCHKEY_TEST_REDIS_URL`` names the first db (worker gwN uses db + N); without it the
    local Redis is used from db 15 downwards.
    """
    explicit = os.environ.get("LATCHKEY_TEST_REDIS_URL")
    if explicit:
        parts = urlsplit(explicit)
        base = int(parts.path.strip("/") or 0)
        return urlunsplit(parts._replace(path=f"/{base + worker_index()}"))
    if not forced_sqlite() and _reachable(REDIS_HOST, REDIS_PORT):
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{15 - worker_index()}"
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"redis://127.0.0.1:{server.server_address[1]}/0"


# The broker -----------------------------------------------------------------------------------


def broker_kind() -> str:
    """``rabbitmq`` when this run tests RabbitMQ as the broker, else ``redis``."""
    explicit = os.environ.get("LATCHKEY_TEST_BROKER_URL", "")
    if explicit:
        return "rabbitmq" if urlsplit(explicit).scheme.startswith(("amqp", "pyamqp")) else "redis"
    kind = os.environ.get("LATCHKEY_TEST_BROKER", "redis").lower() or "redis"
    if kind not in CLOSED_BROKERS:
        raise RuntimeError(f"LATCHKEY_TEST_BROKER={kind!r}: use redis or rabbitmq")
    return kind


def on_rabbitmq() -> bool:
    return broker_kind() == "rabbitmq"


def closed_broker_url() -> str:
    """A broker URL of this run's kind on which nothing listens."""
    return CLOSED_BROKERS[broker_kind()]


def session_vhost_name() -> str:
    return f"{VHOST_PREFIX}{worker_suffix()}_{os.getpid()}"


def rabbitmqctl(*args: str) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("LATCHKEY_TEST_BROKER=rabbitmq needs rabbitmqctl (the local RabbitMQ server)")
    done = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def rabbitmq_eval(expression: str) -> str:
    """Evaluate an Erlang expression on the local RabbitMQ node (test-only broker surgery)."""
    return rabbitmqctl("eval", expression).strip()


def drop_stale_vhosts() -> None:
    """Delete test virtual hosts left behind by sessions whose process is gone."""
    for name in rabbitmqctl("list_vhosts", "--no-table-headers", "name").split():
        pid = name.rsplit("_", 1)[-1]
        if name.startswith(VHOST_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                rabbitmqctl("delete_vhost", name)
            except RuntimeError:
                pass  # another session (an xdist sibling) deleted it first


def fresh_vhost(name: str) -> str:
    """Create virtual host ``name`` on the local RabbitMQ (guest may use it); its broker URL."""
    if not _reachable(RABBITMQ_HOST, RABBITMQ_PORT):
        # Asked for RabbitMQ: falling back to Redis would pass without testing what was asked.
        raise RuntimeError(f"LATCHKEY_TEST_BROKER=rabbitmq but nothing listens on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    drop_stale_vhosts()
    if name in rabbitmqctl("list_vhosts", "--no-table-headers", "name").split():
        rabbitmqctl("delete_vhost", name)
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, RABBITMQ_USER, ".*", ".*", ".*")
    return f"amqp://{RABBITMQ_USER}:{RABBITMQ_USER}@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{name}"


def delete_vhost(name: str) -> None:
    rabbitmqctl("delete_vhost", name)


def broker_url() -> str | None:
    """This session's broker URL, or None for "the Redis" (the settings' default)."""
    explicit = os.environ.get("LATCHKEY_TEST_BROKER_URL")
    if explicit:
        return explicit
    if broker_kind() == "rabbitmq":
        return fresh_vhost(session_vhost_name())
    return None
