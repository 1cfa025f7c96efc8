"""Liveness, readiness and metrics, with no detail that reveals configuration.

``/healthz`` and ``/readyz`` need no auth. ``/metrics`` (Prometheus text format) needs
``Authorization: Bearer $LATCHKEY_METRICS_TOKEN``; without that setting it is open in
development and test only, and not served at all (404) in production. See docs/observability.md.
"""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, current_app, request
from kombu.connection import Connection
from sqlalchemy import text

from app.api.request import current_db
from app.api.responses import json_response
from app.config import Settings
from app.errors import NotFoundError, UnauthorizedError
from app.observability import metrics as obs_metrics

bp = Blueprint("health", __name__)
log = logging.getLogger("latchkey.health")


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


def _check_db() -> bool:
    engine = current_db().engine
    assert engine is not None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # any driver error means "not ready"; logged, never shown
        log.warning("readiness: database unreachable (%s)", type(exc).__name__)
        return False


def _check_broker() -> bool:
    url = current_app.config["LATCHKEY_SETTINGS"].effective_broker_url
    try:
        with Connection(  # type: ignore[no-untyped-call]
            url, connect_timeout=1, transport_options={"socket_timeout": 1}
        ) as conn:
            # No back-off: a probe wants an answer within its own timeout (often 1 s).
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=1)
        return True
    except Exception as exc:  # any transport error means "not ready"; logged, never shown
        log.warning("readiness: broker unreachable (%s)", type(exc).__name__)
        return False


@bp.get("/readyz")
def readyz() -> Response:
    """The database and the broker are reachable (503 otherwise)."""
    checks = {"database": "ok" if _check_db() else "fail", "broker": "ok" if _check_broker() else "fail"}
    ok = all(v == "ok" for v in checks.values())
    return json_response({"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics of this web process, plus job gauges read from the jobs table."""
    _authorize_scrape(current_app.config["LATCHKEY_SETTINGS"])
    resp = Response(obs_metrics.render(current_db()), content_type=obs_metrics.CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _authorize_scrape(settings: Settings) -> None:
    """Let a scrape through only with the metrics token (constant-time compare), if one is set."""
    if settings.metrics_token is None:
        if settings.is_production:
            raise NotFoundError()  # not served: production metrics need a token
        return
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    expected = settings.metrics_token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(credential.strip().encode(), expected):
        raise UnauthorizedError("send the metrics token as 'Authorization: Bearer <token>'")
