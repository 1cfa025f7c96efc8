"""The UI's thin edge: the ``page`` decorator, the app wiring (cookies, headers, template globals).

A page view parses the form, checks who is asking, calls a service and renders, exactly like an
API handler; it ends its unit of work through :func:`app.api.request.commit`, the same commit
(and the same after-commit sends: cache invalidations, then job messages) the API uses.
Sign-in state and CSRF are in ``app.web.signin``, error pages in ``app.web.errors``, form
helpers in ``app.web.forms``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from flask import Flask, Response, g, redirect, request, url_for
from flask import session as cookie
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app.access import OrgAccess, OrgRole, orgs_of
from app.access import org_access as access_of
from app.api.request import commit, session
from app.api.routing import MAX_PATH_PARAM
from app.errors import ForbiddenError, LatchkeyError, NotFoundError, UnauthorizedError
from app.web.blueprint import bp
from app.web.errors import PLAIN_DETAIL, error_page
from app.web.signin import check_csrf, csrf_token, current_user_or_none, load_user

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
    # Who is signed in, for every UI request (the API authenticates with bearer tokens only).
    app.before_request(load_user)
    app.config.setdefault(REVEAL_HIDE_SECONDS, DEFAULT_REVEAL_HIDE_SECONDS)
    # A global, not a context variable, so imported macros (macros.html) can call it too.
    app.jinja_env.globals["csrf_token"] = csrf_token

    from app.api import problems

    def _not_api(exc: HTTPException) -> Response:
        status = exc.code or 500
        if request.path.startswith("/api/"):
            code = "not_found" if status == 404 else "method_not_allowed"
            return problems.problem(status, code, exc.name, exc.description)
        return error_page(status, exc.name, PLAIN_DETAIL.get(status, exc.name))

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
