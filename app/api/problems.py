"""Render every error as application/problem+json (RFC 9457) with a stable ``code``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, g, request
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from app.errors import LatchkeyError, ValidationFailedError

log = logging.getLogger("latchkey.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    412: "version_mismatch",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "rate_limited",
    431: "headers_too_large",
}


def problem(status: int, code: str, title: str, detail: str | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {
        "type": f"https://latchkey.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail or title,
        "code": code,
    }
    request_id = g.get("request_id")
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    import json

    resp = current_app.response_class(
        json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        status=status,
        mimetype="application/problem+json",
    )
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="latchkey"'
    return resp


def render_error(exc: LatchkeyError) -> Response:
    extra = dict(exc.extra)
    if isinstance(exc, ValidationFailedError):
        extra["errors"] = [e.as_dict() for e in exc.errors]
    return problem(exc.status, exc.code, exc.title, exc.detail, **extra)


def register(app: Flask) -> None:
    @app.errorhandler(LatchkeyError)
    def _domain(exc: LatchkeyError) -> Response:
        return render_error(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        resp = problem(status, code, exc.name, exc.description if status != 413 else "request body too large")
        # Keep what the exception says about itself: 405's Allow, 401's WWW-Authenticate, Retry-After.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(IntegrityError)
    def _integrity(exc: IntegrityError) -> Response:
        # Constraint violations that a service did not anticipate: never leak the SQL.
        log.warning("integrity error on %s %s", request.method, request.path)
        return problem(409, "conflict", "Conflict", "the change conflicts with existing data")

    @app.errorhandler(DataError)
    def _data(exc: DataError) -> Response:
        # Input the database cannot store (e.g. NUL in text) that validation did not catch.
        log.warning("data error on %s %s", request.method, request.path)
        return problem(400, "bad_request", "Bad request", "a value in the request cannot be stored")

    @app.errorhandler(OperationalError)
    def _db_down(exc: OperationalError) -> Response:
        log.error("database error on %s %s: %s", request.method, request.path, type(exc.orig).__name__)
        return problem(503, "unavailable", "Service unavailable", "the database is unavailable; retry shortly")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Logged with the request id for operators; the client sees no trace and no detail.
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return problem(500, "internal_error", "Internal error", "an unexpected error occurred")
