"""``create_app()``: builds the web process (API and UI) from settings."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

import redis
from flask import Flask, Response, g, request
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import Settings, load_settings
from app.db import Database, random_token
from app.observability.logs import configure_logging
from app.secrets.checks import check_web_keys
from app.secrets.invalidation import Invalidator

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(config: Settings | dict[str, Any] | None = None) -> Flask:
    """Build the Flask app; in production, refuse to start without the web tier's keys."""
    settings = config if isinstance(config, Settings) else load_settings(**(config or {}))
    check_web_keys(settings)
    configure_logging(settings.log_level, fmt=settings.log_format)

    # Static files are the UI blueprint's (app/web/static), served at /static/.
    app = Flask(__name__, instance_path=os.path.abspath("instance"), static_folder=None)
    app.config["LATCHKEY_SETTINGS"] = settings
    secret_key = settings.secret_key.get_secret_value() if settings.secret_key else random_token()
    app.config["SECRET_KEY"] = secret_key
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # Keyed so a stored idempotency record cannot be used to test guesses of a request body.
    app.config["LATCHKEY_IDEMPOTENCY_KEY"] = hmac.new(
        secret_key.encode(), b"latchkey/idempotency/v1", hashlib.sha256
    ).digest()
    # Signs pagination cursors, so a tampered one is refused before it reaches a query.
    from app.pagination import cursor_key

    app.config["LATCHKEY_CURSOR_KEY"] = cursor_key(secret_key)
    if settings.trusted_proxy_count:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxy_count, x_proto=settings.trusted_proxy_count
        )

    db = Database()
    db.configure(settings.database_url)
    app.extensions["latchkey.db"] = db
    app.extensions["latchkey.public_keys"] = _public_keys(settings)
    from app.jobs.service import Publisher
    from app.worker import make_celery

    # The web tier only publishes task messages by name; it never imports or runs tasks.
    app.extensions["latchkey.publisher"] = Publisher(make_celery(settings), db)
    app.extensions["latchkey.redis"] = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
    )
    app.extensions["latchkey.invalidator"] = Invalidator.for_settings(app.extensions["latchkey.redis"], db, settings)
    db.on_commit("invalidate", app.extensions["latchkey.invalidator"].flush)
    db.on_commit("publish", app.extensions["latchkey.publisher"].publish)

    from app.api import bp as api_bp
    from app.api import problems
    from app.api.request import close_session
    from app.health import bp as health_bp

    app.register_blueprint(api_bp)
    app.register_blueprint(health_bp)
    from app import web

    web.register(app)
    from app.observability import metrics as obs_metrics

    obs_metrics.init_app(app)
    problems.register(app)
    app.teardown_appcontext(close_session)

    from app.observability import redact

    @app.before_request
    def _redaction_scope() -> None:
        # Values submitted in this request are masked in its log lines, and forgotten at teardown.
        g.redaction_scope = redact.push_scope()

    @app.teardown_request
    def _end_redaction_scope(_exc: BaseException | None) -> None:
        token = g.pop("redaction_scope", None)
        if token is not None:
            redact.pop_scope(token)

    @app.before_request
    def _request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else random_token(12)

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        routing = request.routing_exception
        if isinstance(routing, MethodNotAllowed) and resp.status_code == 405:
            # Whichever handler rendered the 405 (API problem or UI page), it says what is allowed.
            for name, value in routing.get_headers():
                if name.lower() != "content-type":
                    resp.headers[name] = value
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.path.startswith("/api/"):
            # API answers may describe secrets; no shared or browser cache should keep them.
            resp.headers.setdefault("Cache-Control", "no-store")
        else:
            # UI pages: strict CSP (no inline script or style), no framing, no caching of pages.
            web.security_headers(resp)
        return resp

    return app


def _public_keys(settings: Settings) -> Any:
    if not settings.public_keys:
        return None
    from app.secrets.keyring import PublicKeySet

    return PublicKeySet.parse(settings.public_keys)
