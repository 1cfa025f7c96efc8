"""Sign-in state: the server-side web session behind the cookie, CSRF tokens, safe redirects."""

from __future__ import annotations

import hashlib
import hmac
import secrets as _random
from datetime import timedelta
from urllib.parse import unquote, urlsplit

from flask import current_app, g, request
from flask import session as cookie

from app.api.request import session
from app.errors import BadRequestError
from app.identity import service as identity
from app.models import User


class CsrfError(BadRequestError):
    code, title = "csrf_failed", "This form has expired"


def password_fingerprint(user: User) -> str:
    """Ties a session to the password it was opened with: a password change ends other sessions."""
    key = current_app.config["SECRET_KEY"].encode()
    return hmac.new(key, (user.password_hash or "").encode(), hashlib.sha256).hexdigest()[:32]


def load_user() -> None:
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
