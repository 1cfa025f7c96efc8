"""Sign in, sign out, the home redirect and the org switcher."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets as _random

from flask import current_app, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from itsdangerous import BadData, URLSafeTimedSerializer
from redis import RedisError
from werkzeug.wrappers import Response

from app.access import org_access as access_of
from app.access import orgs_of
from app.api.request import commit, request_context
from app.audit import service as audit
from app.errors import RateLimitedError, ServiceUnavailableError, UnauthorizedError
from app.identity import service as identity
from app.models import Org, User
from app.web.blueprint import bp
from app.web.pages import db, page
from app.web.signin import check_csrf, current_user_or_none, end_session, safe_next, start_session

log = logging.getLogger("latchkey.web")

# The looser ceilings (per email from anywhere, per address for any email) are fixed windows.
LOGIN_WINDOW_SECONDS = 15 * 60
# A pair's failure count is forgotten a day after its last failure (or at once on success).
PAIR_MEMORY_SECONDS = 24 * 3600
# The limiter's keys are HMACs under a subkey of SECRET_KEY: a Redis reader cannot confirm a
# guessed email address by hashing it.
LIMITER_KEY_LABEL = b"latchkey/login-limit"
# The "known device" cookie (OWASP device cookies), signed under SECRET_KEY with this salt.
DEVICE_COOKIE_SALT = "latchkey/device-cookie"

# One atomic step BEFORE the password is checked: refuse while the pair is locked or (unless
# the attempt comes from a known device) a ceiling is reached; otherwise count the attempt as
# a failure (success refunds it) and, from the free-th failure on, lock the pair for
# base * 2^(n - free) ms (capped). A known device's attempts neither meet nor fill the ceilings.
# KEYS: pair count, pair lock, email window, address window.
# ARGV: free, base ms, max ms, pair memory s, window s, email ceiling, address ceiling, known device.
# Returns {1, n} when the attempt may be verified, {0, ms to wait} when refused.
RESERVE_ATTEMPT = """
local locked = redis.call('PTTL', KEYS[2])
if locked > 0 then return {0, locked} end
local known = ARGV[8] == '1'
if not known then
  for i = 3, 4 do
    local count = tonumber(redis.call('GET', KEYS[i]) or '0')
    if count >= tonumber(ARGV[i + 3]) then return {0, math.max(redis.call('PTTL', KEYS[i]), 1000)} end
  end
end
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if not known then
  for i = 3, 4 do
    if redis.call('INCR', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ARGV[5]) end
  end
end
local free = tonumber(ARGV[1])
if n >= free then
  local ms = tonumber(ARGV[2]) * 2 ^ math.min(n - free, 40)
  ms = math.floor(math.min(ms, tonumber(ARGV[3])))
  redis.call('SET', KEYS[2], '1', 'PX', ms)
end
return {1, n}
"""


# Success: forget the pair, and take the attempt back from the ceilings it was counted in
# (never below zero, never creating a key without expiry). ARGV: known device.
REFUND_ATTEMPT = """
redis.call('DEL', KEYS[1], KEYS[2])
if ARGV[1] ~= '1' then
  for i = 3, 4 do
    if tonumber(redis.call('GET', KEYS[i]) or '0') > 0 then redis.call('DECR', KEYS[i]) end
  end
end
return 1
"""


class LoginRefusedError(RateLimitedError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed sign-ins; wait a few minutes and try again")
        self.retry_after = retry_after


def _normal_email(email: str) -> str:
    return email.strip().lower()


def client_address() -> str:
    """The client as the limiter counts it: an IPv6 address by its /64 (what one host gets)."""
    raw = request.remote_addr or "unknown"
    try:
        address = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return raw[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _limiter_id(value: str) -> str:
    secret = current_app.config["SECRET_KEY"].encode()
    subkey = hmac.new(secret, LIMITER_KEY_LABEL, hashlib.sha256).digest()
    return hmac.new(subkey, value.encode(), hashlib.sha256).hexdigest()[:32]


def _limiter_keys(email: str, device: str | None) -> list[str]:
    """The pair is (email, known device) when the attempt carries a device cookie, else (email, address)."""
    namespace = current_app.config["LATCHKEY_SETTINGS"].queue
    email_id = _limiter_id(_normal_email(email))
    address = client_address()
    pair_id = _limiter_id(f"{email_id}|device:{device}" if device else f"{email_id}|{address}")
    base = f"lk:rl:login:{namespace}"
    return [
        f"{base}:pair:{pair_id}",
        f"{base}:pair-lock:{pair_id}",
        f"{base}:email:{email_id}",
        f"{base}:ip:{address}",
    ]


# Known devices --------------------------------------------------------------------------------


def _device_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=DEVICE_COOKIE_SALT)


def device_cookie_name() -> str:
    secure = current_app.config["LATCHKEY_SETTINGS"].is_production
    return "__Host-latchkey-device" if secure else "latchkey_device"


def known_device(email: str) -> str | None:
    """The device id of a valid device cookie issued to this email on sign-in, else None."""
    raw = request.cookies.get(device_cookie_name())
    if not raw or len(raw) > 1000:
        return None
    max_age = current_app.config["LATCHKEY_SETTINGS"].login_device_cookie_seconds
    try:
        data = _device_serializer().loads(raw, max_age=max_age)
    except BadData:
        return None
    if not isinstance(data, dict) or data.get("email") != _normal_email(email):
        return None
    device = data.get("device")
    return device if isinstance(device, str) and device else None


def _remember_device(resp: Response, user: User, device: str | None) -> None:
    """After a successful sign-in: (re)issue the device cookie for this user and email."""
    settings = current_app.config["LATCHKEY_SETTINGS"]
    value = _device_serializer().dumps(
        {"uid": user.id, "email": _normal_email(user.email), "device": device or _random.token_urlsafe(16)}
    )
    resp.set_cookie(
        device_cookie_name(),
        value,
        max_age=settings.login_device_cookie_seconds,
        path="/",
        secure=settings.is_production,
        httponly=True,
        samesite="Lax",
    )


def _reserve_attempt(email: str, device: str | None) -> None:
    """Count this attempt before verifying it; refuse (429) while locked, 503 without Redis.

    Fails closed: without Redis nothing can be counted, so sign-in waits (existing sessions
    and API tokens keep working; they do not need the limiter).
    """
    settings = current_app.config["LATCHKEY_SETTINGS"]
    client = current_app.extensions["latchkey.redis"]
    try:
        allowed, amount = client.eval(
            RESERVE_ATTEMPT,
            4,
            *_limiter_keys(email, device),
            settings.login_free_failures_per_pair,
            settings.login_backoff_base_seconds * 1000,
            settings.login_backoff_max_seconds * 1000,
            PAIR_MEMORY_SECONDS,
            LOGIN_WINDOW_SECONDS,
            settings.login_max_failures_per_email,
            settings.login_max_failures_per_address,
            "1" if device else "0",
        )
    except RedisError as exc:
        log.warning("login limiter unavailable, sign-in refused: %s", type(exc).__name__)
        raise ServiceUnavailableError("sign-in is unavailable for a moment; try again shortly") from None
    if not int(allowed):
        raise LoginRefusedError(max(1, math.ceil(int(amount) / 1000)))


def _attempt_succeeded(email: str, device: str | None) -> None:
    """The right password: the pair starts afresh and the attempt no longer counts anywhere."""
    client = current_app.extensions["latchkey.redis"]
    try:
        client.eval(REFUND_ATTEMPT, 4, *_limiter_keys(email, device), "1" if device else "0")
    except RedisError as exc:
        log.warning("login limiter unavailable: %s", type(exc).__name__)


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """Sign in with email and password; a fresh server-side session on success."""
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if current_user_or_none() is not None:
            return redirect(target or url_for("web.home"))
        return render_template("login.html", next=target, email="", error=None)
    check_csrf()
    email = request.form.get("email", "")[:320]
    password = request.form.get("password", "")[:1024]
    s = db()
    device = known_device(email)
    try:
        _reserve_attempt(email, device)
    except LoginRefusedError as exc:
        page = render_template("login.html", next=target, email=email, error=exc.detail)
        return page, 429, {"Retry-After": str(exc.retry_after)}
    except ServiceUnavailableError as exc:
        return render_template("login.html", next=target, email=email, error=exc.detail), 503
    try:
        user = identity.check_password(s, email, password)
    except UnauthorizedError:
        s.rollback()
        return render_template("login.html", next=target, email=email, error="Invalid email or password."), 401
    _attempt_succeeded(email, device)
    start_session(user)
    g.user = user
    audit.record(s, request_context(), "user.login", org_id=None, target_type="user", target_id=user.id)
    commit(s)
    resp = redirect(target or url_for("web.home"))
    _remember_device(resp, user, device)
    return resp


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    """Sign out: the server-side session is revoked and the cookie cleared (the CSRF token with it)."""
    check_csrf()
    end_session()
    commit(db())
    flash("You are signed out.", "info")
    return redirect(url_for("web.login"))


@page("/")
def home() -> ResponseReturnValue:
    """The first org of the signed-in user (or the last one they used)."""
    from flask import session as cookie

    user = current_user_or_none()
    assert user is not None
    orgs = orgs_of(db(), user)
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
    access = access_of(db(), user, slug)
    return redirect(url_for("web.list_secrets", org=access.org.slug))


@page("/account")
def account() -> ResponseReturnValue:
    """The signed-in user's live sessions, with "sign out everywhere"."""
    user = current_user_or_none()
    assert user is not None
    current = g.get("web_session")
    sessions = identity.list_web_sessions(db(), user)
    return render_template("account.html", sessions=sessions, current_id=current.id if current else None)


@page("/account/sessions/revoke", methods=["POST"])
def revoke_sessions() -> ResponseReturnValue:
    """Sign out everywhere: every session of this user ends, this one included."""
    user = current_user_or_none()
    assert user is not None
    identity.revoke_sessions(db(), request_context(), user)
    end_session()
    flash("You are signed out everywhere.", "info")
    return redirect(url_for("web.login"))


@page("/invitations/<token>", methods=["GET", "POST"])
def invitation(token: str) -> ResponseReturnValue:
    """An org invitation for the signed-in address: shown on GET, accepted on POST."""
    user = current_user_or_none()
    assert user is not None
    s = db()
    if request.method == "GET":
        found = identity.find_invitation(s, user, token)
        org = s.get(Org, found.org_id)
        return render_template("invitation.html", invitation=found, org=org, token=token)
    joined = identity.accept_invitation(s, request_context(), user, token)
    flash(f"You joined {joined.org.name} as {joined.role.value}.", "success")
    return redirect(url_for("web.list_secrets", org=joined.org.slug))
