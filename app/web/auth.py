"""Sign in, sign out, the home redirect and the org switcher."""

from __future__ import annotations

import hashlib
import logging
import time

from flask import current_app, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from redis import RedisError

from app.api.framework import commit, request_context
from app.audit import service as audit
from app.errors import RateLimitedError, UnauthorizedError
from app.identity import service as identity
from app.web.core import (
    bp,
    check_csrf,
    current_user_or_none,
    db,
    end_session,
    page,
    safe_next,
    start_session,
)

log = logging.getLogger("latchkey.web")

# Failed sign-ins counted per address and per email in fixed windows (Redis).
LOGIN_WINDOW_SECONDS = 15 * 60
MAX_FAILURES_PER_EMAIL = 10
MAX_FAILURES_PER_ADDRESS = 50


def _failure_keys(email: str) -> list[tuple[str, int]]:
    namespace = current_app.config["LATCHKEY_SETTINGS"].queue
    window = int(time.time() // LOGIN_WINDOW_SECONDS)
    email_id = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return [
        (f"lk:rl:login:{namespace}:email:{email_id}:{window}", MAX_FAILURES_PER_EMAIL),
        (f"lk:rl:login:{namespace}:ip:{request.remote_addr}:{window}", MAX_FAILURES_PER_ADDRESS),
    ]


def _check_login_limit(email: str) -> None:
    client = current_app.extensions["latchkey.redis"]
    try:
        counts = client.mget([k for k, _ in _failure_keys(email)])
    except RedisError as exc:
        # Sign-in stays possible without Redis; argon2's cost still bounds guessing.
        log.warning("login limiter unavailable: %s", type(exc).__name__)
        return
    for (_key, limit), count in zip(_failure_keys(email), counts, strict=True):
        if count is not None and int(count) >= limit:
            raise RateLimitedError("too many failed sign-ins; wait a few minutes and try again")


def _count_failure(email: str) -> None:
    client = current_app.extensions["latchkey.redis"]
    try:
        pipe = client.pipeline(transaction=True)
        for key, _limit in _failure_keys(email):
            pipe.incr(key)
            pipe.expire(key, LOGIN_WINDOW_SECONDS + 5)
        pipe.execute()
    except RedisError as exc:
        log.warning("login limiter unavailable: %s", type(exc).__name__)


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """Sign in with email and password; a fresh session on success."""
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user_or_none() is not None:
            return redirect(target or url_for("web.home"))
        return render_template("login.html", next=target, email="", error=None)
    check_csrf()
    email = request.form.get("email", "")[:320]
    password = request.form.get("password", "")[:1024]
    s = db()
    try:
        _check_login_limit(email)
        user = identity.check_password(s, email, password)
    except RateLimitedError as exc:
        s.rollback()
        return render_template("login.html", next=target, email=email, error=exc.detail), 429
    except UnauthorizedError:
        s.rollback()
        _count_failure(email)
        return render_template("login.html", next=target, email=email, error="Invalid email or password."), 401
    start_session(user)
    g.user = user
    audit.record(s, request_context(), "user.login", org_id=None, target_type="user", target_id=user.id)
    commit(s)
    return redirect(target or url_for("web.home"))


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    """Sign out: the session is cleared, the CSRF token with it."""
    check_csrf()
    end_session()
    flash("You are signed out.", "info")
    return redirect(url_for("web.login"))


@page("/")
def home() -> ResponseReturnValue:
    """The first org of the signed-in user (or the last one they used)."""
    from flask import session as cookie

    user = current_user_or_none()
    assert user is not None
    orgs = identity.orgs_of(db(), user)
    last = cookie.get("org")
    chosen = next((a for a in orgs if a.org.slug == last), orgs[0] if orgs else None)
    if chosen is None:
        if user.is_operator:
            return redirect(url_for("web.operator_home"))
        return render_template("no_orgs.html")
    return redirect(url_for("web.list_secrets", org=chosen.org.slug))


@page("/switch")
def switch_org() -> ResponseReturnValue:
    """The org switcher (a GET form): another member org's secrets page; any other slug is 404."""
    user = current_user_or_none()
    assert user is not None
    slug = request.args.get("org", "")[:100]
    access = identity.org_access(db(), user, slug)
    return redirect(url_for("web.list_secrets", org=access.org.slug))
