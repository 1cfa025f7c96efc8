"""Liveness, readiness and metrics: no auth, and no detail that reveals configuration.

``/metrics`` (Prometheus text format) needs no auth either: keep it off the public
internet (serve it on an internal listener, or block it at the proxy); see docs/observability.md.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app
from kombu.connection import Connection
from sqlalchemy import text

from app.api.framework import current_db, json_response
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
    resp = Response(obs_metrics.render(current_db()), content_type=obs_metrics.CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    return resp
