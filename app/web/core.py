"""The UI's thin edge: sign-in state, CSRF, the ``page`` decorator, error pages, form errors.

A page view parses the form, checks who is asking, calls a service and renders, exactly like an
API handler; it ends its unit of work through :func:`app.api.framework.commit`, the same commit
and after-commit step (cache invalidations, then job messages) the API uses.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets as _random
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask import session as cookie
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app.access import OrgAccess, OrgRole, orgs_of
from app.access import org_access as access_of
from app.api.framework import MAX_PATH_PARAM, commit, session
from app.errors import (
    BadRequestError,
    ForbiddenError,
    LatchkeyError,
    NotFoundError,
    UnauthorizedError,
    ValidationFailedError,
)
from app.identity import service as identity
from app.models import User

log = logging.getLogger("latchkey.web")

bp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

# How long a revealed value stays on screen; tests shorten it through app.config.
REVEAL_HIDE_SECONDS = "LATCHKEY_UI_REVEAL_HIDE_SECONDS"
DEFAULT_REVEAL_HIDE_SECONDS = 30

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)


class CsrfError(BadRequestError):
    code, title = "csrf_failed", "This form has expired"


def init_app(app: Flask) -> None:
    """Cookie flags, the HTML 404/405 pages for non-API paths, security headers for UI pages."""
    settings = app.config["LATCHKEY_SETTINGS"]
    secure = settings.is_production
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure,
        # The __Host- prefix makes the browser refuse the cookie unless it is Secure, host-only, Path=/.
        SESSION_COOKIE_NAME="__Host-latchkey" if secure else "latchkey_session",
        # The cookie and the server-side row (web_sessions.expires_at) end together.
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=settings.session_lifetime_seconds),
    )
    app.config.setdefault(REVEAL_HIDE_SECONDS, DEFAULT_REVEAL_HIDE_SECONDS)
    # A global, not a context variable, so imported macros (macros.html) can call it too.
    app.jinja_env.globals["csrf_token"] = csrf_token

    from app.api import problems

    def _not_api(exc: HTTPException) -> Response:
        status = exc.code or 500
        if request.path.startswith("/api/"):
            code = "not_found" if status == 404 else "method_not_allowed"
            return problems.problem(status, code, exc.name, exc.description)
        return error_page(status, exc.name, _PLAIN_DETAIL.get(status, exc.name))

    app.register_error_handler(404, _not_api)
    app.register_error_handler(405, _not_api)


def security_headers(resp: Response) -> Response:
    """Headers for every UI answer: strict CSP, no framing, and no caching of pages."""
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if not request.path.startswith("/static/"):
        # Pages carry the CSRF token and org metadata: no shared or back/forward cache keeps them.
        resp.headers["Cache-Control"] = "no-store"
    return resp


# Who is signed in -----------------------------------------------------------------------------


def password_fingerprint(user: User) -> str:
    """Ties a session to the password it was opened with: a password change ends other sessions."""
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, (user.password_hash or "").encode(), hashlib.sha256).hexdigest()[:32]


@bp.before_app_request
def _load_user() -> None:
    # The API authenticates with bearer tokens only; a session cookie never opens an API route.
    if request.path.startswith("/api/") or request.path.startswith("/static/"):
        return
    raw = cookie.get("sid")
    if not isinstance(raw, str):
        if "uid" in cookie:  # a cookie from before server-side sessions: sign in again
            cookie.clear()
        return
    s = session()
    found = identity.authenticate_web_session(s, raw)
    if found is None or not hmac.compare_digest(str(cookie.get("pwf", "")), password_fingerprint(found[0])):
        cookie.clear()
        return
    user, web = found
    if identity.touch_web_session(s, web):
        s.commit()  # its own short transaction, at most once a minute per session
    g.user = user
    g.web_session = web


def current_user_or_none() -> User | None:
    user: User | None = g.get("user")
    return user


def start_session(user: User) -> None:
    """A fresh session on sign-in: a new server-side row; nothing (CSRF token included) survives from before."""
    lifetime = timedelta(seconds=current_app.config["LATCHKEY_SETTINGS"].session_lifetime_seconds)
    # Signing in again (as anyone) ends the browser's previous session: a copy of the old
    # cookie opens nothing afterwards.
    previous = cookie.get("sid")
    if isinstance(previous, str) and previous:
        identity.end_web_session(session(), previous)
    _row, raw = identity.create_web_session(
        session(), user, lifetime, ip=request.remote_addr, user_agent=request.headers.get("User-Agent")
    )
    cookie.clear()
    cookie.permanent = True
    cookie["sid"] = raw
    cookie["pwf"] = password_fingerprint(user)
    cookie["csrf"] = _random.token_urlsafe(32)


def end_session() -> None:
    """Sign-out: the server-side row is revoked (the caller commits), then the cookie is cleared."""
    raw = cookie.get("sid")
    if isinstance(raw, str) and raw:
        identity.end_web_session(session(), raw)
    cookie.clear()


# CSRF -----------------------------------------------------------------------------------------


def csrf_token() -> str:
    token = cookie.get("csrf")
    if not isinstance(token, str) or not token:
        token = _random.token_urlsafe(32)
        cookie["csrf"] = token
    return token


def check_csrf() -> None:
    """Every POST carries the session's token (form field or ``X-CSRF-Token``), from our own origin."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise CsrfError("the request came from another site")
    sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    expected = cookie.get("csrf")
    if not isinstance(expected, str) or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise CsrfError("the security token of this form is missing or expired; reload the page and try again")


# The decorator --------------------------------------------------------------------------------


MAX_NEXT = 2048


def safe_next(target: str | None) -> str | None:
    """A same-site path to go back to after sign-in; anything that could leave the site is dropped.

    Browsers drop tabs and newlines inside URLs and read ``\\`` as ``/``, and a proxy or a later
    redirect may percent-decode, so the value is checked raw and decoded (until stable): no
    control character, no backslash, and it must start with one ``/`` not followed by ``/``.
    """
    if not target or len(target) > MAX_NEXT:
        return None
    form = target
    for _ in range(6):
        if any(ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in form):
            return None
        if not form.startswith("/") or form.startswith("//"):
            return None
        decoded = unquote(form)
        if decoded == form:
            return target
        form = decoded
    return None  # still changing after five decodings: not a path anyone types


def page(
    rule: str,
    methods: Iterable[str] = ("GET",),
    *,
    org_role: OrgRole | None = None,
    operator: bool = False,
    json: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a UI page. A rule with ``<org>`` hands the view an :class:`OrgAccess` as ``access``.

    ``org_role`` is what the page needs in that org (``"member"`` or ``"admin"``); an org rule
    must declare it.

    Signed-out visitors are sent to the sign-in page (JSON endpoints answer 401); a POST needs
    the CSRF token; ``operator`` needs the instance operator flag.
    Success commits through the API's commit step; a domain error rolls back and renders a page.
    """

    if ("<org>" in rule) != (org_role is not None):
        raise ValueError(f"a page under <org> declares org_role (and only such a page): {rule}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def view(**path: Any) -> Any:
            s = session()
            g.web_json = json
            try:
                for value in path.values():
                    if not (0 < len(value) <= MAX_PATH_PARAM and value.isprintable()):
                        raise NotFoundError()
                user = current_user_or_none()
                if user is None:
                    if json or request.method != "GET":
                        raise UnauthorizedError("sign in first")
                    return redirect(url_for("web.login", next=request.full_path.rstrip("?")))
                if request.method == "POST":
                    check_csrf()
                if operator and not user.is_operator:
                    raise ForbiddenError("this page is for instance operators")
                kwargs: dict[str, Any] = dict(path)
                if org_role is not None:
                    access = access_of(s, user, kwargs.pop("org"))
                    g.access = access
                    if cookie.get("org") != access.org.slug:  # remembered for "/" and the operator page
                        cookie["org"] = access.org.slug
                    access.require(org_role)
                    kwargs["access"] = access
                out = fn(**kwargs)
                commit(s)
                return out
            except LatchkeyError:
                s.rollback()
                raise

        bp.add_url_rule(rule, fn.__name__, view, methods=list(methods))
        return view

    return decorator


def db() -> Session:
    return session()


def current_access() -> OrgAccess | None:
    access: OrgAccess | None = g.get("access")
    return access


# Rendering ------------------------------------------------------------------------------------


_PLAIN_DETAIL = {
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


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    user = current_user_or_none()
    orgs: list[OrgAccess] = []
    if user is not None and not request.path.startswith("/api/"):
        orgs = orgs_of(session(), user)
    access = current_access()
    if access is None and orgs:
        # Pages outside an org (operator) keep the nav of the org last used.
        access = next((a for a in orgs if a.org.slug == cookie.get("org")), orgs[0])
    return {
        "current_user": user,
        "current_access": current_access(),
        "nav_access": access,
        "user_orgs": orgs,
    }


@bp.errorhandler(LatchkeyError)
def _domain_error(exc: LatchkeyError) -> Response:
    if g.get("web_json"):
        resp = jsonify({"code": exc.code, "title": exc.title, "detail": exc.detail})
        resp.status_code = exc.status
        resp.headers["Cache-Control"] = "no-store"
        return resp
    if isinstance(exc, UnauthorizedError):
        return redirect(url_for("web.login"))  # type: ignore[return-value]
    detail = exc.detail if exc.status not in (404,) else _PLAIN_DETAIL[404]
    return error_page(exc.status, exc.title, detail)


@bp.errorhandler(IntegrityError)
def _integrity(_exc: IntegrityError) -> Response:
    session().rollback()
    log.warning("integrity error on %s %s", request.method, request.path)
    return error_page(409, "Conflict", "The change conflicts with existing data.")


@bp.errorhandler(OperationalError)
def _db_down(exc: OperationalError) -> Response:
    log.error("database error on %s %s: %s", request.method, request.path, type(exc.orig).__name__)
    return error_page(503, "Service unavailable", _PLAIN_DETAIL[503])


@bp.errorhandler(HTTPException)
def _http(exc: HTTPException) -> Response:
    status = exc.code or 500
    return error_page(status, exc.name, _PLAIN_DETAIL.get(status, exc.name))


# Form errors ----------------------------------------------------------------------------------


def form_errors(exc: LatchkeyError, fields: Iterable[str], rename: dict[str, str] | None = None) -> dict[str, str]:
    """Turn a service error into messages next to the form's fields (``_general``: no field of this form)."""
    known = set(fields)
    rename = rename or {}
    out: dict[str, str] = {}
    items = [(e.field, e.message) for e in exc.errors] if isinstance(exc, ValidationFailedError) else [("", exc.detail)]
    for field, message in items:
        # "config.base_url" -> base_url, "allowed_hosts.0" / "tools.1.tool_name" -> their list field.
        parts = field.split(".")
        candidates = [rename.get(field, field), parts[-1], rename.get(parts[0], parts[0])]
        name = next((c for c in candidates if c in known), "_general")
        out.setdefault(name, message)
    return out


def invalid(template: str, status: int, **context: Any) -> tuple[str, int]:
    """Re-render a form after a refused change: the unit of work is rolled back first."""
    session().rollback()
    return render_template(template, **context), status


def int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit() or len(value.strip()) > 12:
        return None
    return int(value.strip())
