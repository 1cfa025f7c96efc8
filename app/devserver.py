"""``latchkey dev``: the whole platform in one process on embedded defaults.

SQLite file database, an in-process Redis-protocol server (fakeredis) as broker and cache,
a Celery worker thread, development sealing keys under ``instance/``, and a seeded demo
org whose admin login and API token are printed. Nothing here is for production: the
keys are marked as development keys and a production process refuses them.
"""

from __future__ import annotations

import os
import secrets as _random
import threading
import warnings
from pathlib import Path

from sqlalchemy import select

from app.config import DEV_SECRET_KEY_PREFIX, Environment, Settings, load_settings
from app.context import RequestContext, cli_context
from app.db import Database, utcnow

DEMO_ORG = "demo"
DEMO_ADMIN = "admin@demo.local"


def _dev_secret_key(instance: Path) -> str:
    path = instance / "dev-secret-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(DEV_SECRET_KEY_PREFIX + _random.token_urlsafe(32))
    return path.read_text().strip()


def _dev_keyring(instance: Path) -> tuple[Path, str]:
    from app.secrets.keyring import Keyring

    path = instance / "dev-keyring.json"
    if not path.exists():
        Keyring.generate(dev=True).write(path)
    return path, Keyring.load(path).public_set().dumps()


def start_embedded_redis() -> str:
    """Start fakeredis's TCP server on a free loopback port; returns its URL."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0))
    # Without daemon threads the broker's long-lived client connections keep the process alive on exit.
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="embedded-redis", daemon=True).start()
    return f"redis://127.0.0.1:{server.server_address[1]}/0"


def dev_settings(instance: Path, redis_url: str, public_url: str = "http://127.0.0.1:5080") -> Settings:
    ring_path, public_keys = _dev_keyring(instance)
    env = {
        "LATCHKEY_ENV": Environment.DEVELOPMENT.value,
        "LATCHKEY_DATABASE_URL": f"sqlite:///{instance.resolve() / 'latchkey.db'}",
        "LATCHKEY_REDIS_URL": redis_url,
        "LATCHKEY_SECRET_KEY": _dev_secret_key(instance),
        "LATCHKEY_PUBLIC_KEYS": public_keys,
        "LATCHKEY_PRIVATE_KEYS_FILE": str(ring_path.resolve()),
        # Local MCP servers and model stand-ins live on loopback and plain http in development.
        "LATCHKEY_EGRESS_ALLOW_PRIVATE": "true",
        "LATCHKEY_EGRESS_ALLOW_HTTP_HOSTS": "127.0.0.1,localhost",
        # People read the dev console; production defaults to JSON lines.
        "LATCHKEY_LOG_FORMAT": "text",
        # Where an OAuth authorization server sends the browser back (/oauth/callback).
        "LATCHKEY_PUBLIC_URL": public_url,
    }
    # Only these: the worker thread and the web app are both built from the returned settings.
    return load_settings(env)


def seed(db: Database, ctx: RequestContext) -> tuple[str, str]:
    """Ensure the demo org and its admin; reset the admin password and mint a fresh token.

    The demo admin is also an instance operator, so the operator page (backfill, verify,
    re-seal) can be tried too; that is for this embedded default only.
    """
    from app.access import OrgAccess
    from app.identity import service as identity
    from app.identity.schemas import OrgCreate, PasswordSet, TokenCreate, UserCreate
    from app.models import ApiToken, Org, Role, User

    password = _random.token_urlsafe(12)
    with db.session() as s:
        org = s.scalar(select(Org).where(Org.slug == DEMO_ORG)) or identity.create_org(
            s, ctx, OrgCreate(slug=DEMO_ORG, name="Demo")
        )
        user = s.scalar(select(User).where(User.email == DEMO_ADMIN))
        if user is None:
            user = identity.create_user(s, ctx, UserCreate(email=DEMO_ADMIN, password=password, operator=True))
        else:
            identity.set_password(s, ctx, user, PasswordSet(password=password))
            user.is_operator = True
        identity.add_member(s, ctx, OrgAccess.system(org), user, Role.ADMIN)
        # One live dev token at a time: earlier ones printed by previous runs are revoked.
        for old in s.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.name == "dev")):
            if old.revoked_at is None:
                old.revoked_at = utcnow()
        _tok, raw = identity.create_token(s, ctx, user, TokenCreate(name="dev"))
    return password, raw


def start_worker_thread(settings: Settings) -> None:
    from celery.platforms import SecurityWarning

    from app.worker import make_celery

    celery = make_celery(settings)
    # Run as root (a container, a newcomer's VM), Celery warns that the worker has superuser
    # privileges. The danger it means is pickle: a message that runs code as root. This worker
    # accepts JSON only, and Celery still refuses to start a root worker that accepts pickle
    # (an exception, not a warning). The thread shares the process, and so the user, of the
    # development server the newcomer started; dropping privileges is not possible from here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SecurityWarning)
        worker = celery.Worker(pool="threads", concurrency=2, redirect_stdouts=False, loglevel="WARNING", quiet=True)
    threading.Thread(target=worker.start, name="celery-worker", daemon=True).start()


def run(host: str = "127.0.0.1", port: int = 5080, instance_dir: Path = Path("instance")) -> None:
    from app import migrate
    from app.factory import create_app

    instance_dir.mkdir(parents=True, exist_ok=True)
    settings = dev_settings(instance_dir, start_embedded_redis(), f"http://{host}:{port}")
    migrate.upgrade(settings.database_url)
    app = create_app(settings)
    password, token = seed(app.extensions["latchkey.db"], cli_context())
    start_worker_thread(settings)
    base = f"http://{host}:{port}"
    print(
        "\nLatchkey is running on embedded defaults (development only)\n"
        f"  URL:     {base}/\n"
        f"  API:     {base}/api/v1   (OpenAPI: {base}/api/v1/openapi.json)\n"
        f"  Login:   {DEMO_ADMIN}  password: {password}\n"
        f"  Token:   {token}\n"
        f"  Org:     {DEMO_ORG} (you are its admin, and an instance operator: {base}/operator)\n"
        f"  Data:    {instance_dir.resolve()} (SQLite database, development keys)\n\n"
        f"  Try:     curl -H 'Authorization: Bearer {token}' {base}/api/v1/orgs/{DEMO_ORG}/secrets\n",
        flush=True,
    )
    app.run(host=host, port=port, use_reloader=False, threaded=True)
