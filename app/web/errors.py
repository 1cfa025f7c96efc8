"""Error pages: domain errors, constraint races, database outages and HTTP errors as HTML (or JSON)."""

from __future__ import annotations

from flask import Response, g, jsonify, make_response, redirect, render_template, request, url_for
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import HTTPException

from app.api.request import session
from app.errors import LatchkeyError, UnauthorizedError
from app.web.blueprint import bp, log

PLAIN_DETAIL = {
    400: "The request could not be understood.",
    401: "Sign in to continue.",
    403: "You do not have permission to do this.",
    404: "There is nothing here, or you do not have access to it.",
    405: "This address does not accept that kind of request.",
    409: "The change conflicts with the current state.",
    429: "Too many attempts; wait a moment and try again.",
    503: "A service Latchkey needs is unavailable; try again shortly.",
}


def error_page(status: int, title: str, detail: str) -> Response:
    resp = make_response(render_template("error.html", status=status, title=title, detail=detail), status)
    return resp


@bp.errorhandler(LatchkeyError)
def domain_error_page(exc: LatchkeyError) -> Response:
    if g.get("web_json"):
        resp = jsonify({"code": exc.code, "title": exc.title, "detail": exc.detail})
        resp.status_code = exc.status
        resp.headers["Cache-Control"] = "no-store"
        return resp
    if isinstance(exc, UnauthorizedError):
        return redirect(url_for("web.login"))  # type: ignore[return-value]
    detail = exc.detail if exc.status not in (404,) else PLAIN_DETAIL[404]
    return error_page(exc.status, exc.title, detail)


@bp.errorhandler(IntegrityError)
def integrity_page(_exc: IntegrityError) -> Response:
    session().rollback()
    log.warning("integrity error on %s %s", request.method, request.path)
    return error_page(409, "Conflict", "The change conflicts with existing data.")


@bp.errorhandler(OperationalError)
def db_down_page(exc: OperationalError) -> Response:
    log.error("database error on %s %s: %s", request.method, request.path, type(exc.orig).__name__)
    return error_page(503, "Service unavailable", PLAIN_DETAIL[503])


@bp.errorhandler(HTTPException)
def http_error_page(exc: HTTPException) -> Response:
    status = exc.code or 500
    return error_page(status, exc.name, PLAIN_DETAIL.get(status, exc.name))
