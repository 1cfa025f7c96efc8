"""Reveal: an org admin reads a secret's value, and the web tier still cannot open storage.

One request does all of it:

1. the secret must exist in the org (404 otherwise), checked before anything is counted or
   queued;
2. the caller's per-user rate limit: a fixed window in Redis (``lk:rl:reveal:{user}:{window}``);
   it fails closed, because a reveal must never go unmetered;
3. a one-request X25519 key pair; a ``secrets.reveal_value`` job carrying the secret id and the
   reply *public* key is committed and published at once (the request waits for the answer,
   so publishing cannot be left to the framework's after-commit step);
4. a worker first applies the controls the web tier cannot switch off (the reveal switch, the
   per-user, per-org and instance limits, counted by the worker: :class:`RevealGate`), then
   resolves the secret, records ``secret.reveal_served`` (or ``secret.reveal_refused``), seals
   ``{"value", "version"}`` to the reply key, bound to (org, secret, job), and pushes it to
   ``lk:reveal:{job_id}`` (60 s TTL);
5. the request pops that key (BLPOP) until its timeout, opens the reply with the private key,
   which never leaves this function's frame, records ``secret.reveal`` and returns.

Redis (the broker, the reply list) only ever holds the sealed reply; the job row holds the
version, never the value.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis import Redis, RedisError
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.errors import (
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
    UnauthorizedError,
    WorkerError,
)
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.secrets import replies
from app.secrets import service as secrets
from app.secrets.sealing import CiphertextBytes, encode_context

log = logging.getLogger("latchkey.reveal")

REPLY_TTL_SECONDS = replies.REPLY_TTL_SECONDS
RATE_WINDOW_SECONDS = 60


class RevealDisabledError(ForbiddenError):
    code, title = "reveal_disabled", "Reveal is disabled"


@dataclass(frozen=True)
class RevealResult:
    value: str
    version: int
    job_id: str

    def __repr__(self) -> str:  # never the value
        return f"RevealResult(version={self.version}, job_id={self.job_id!r})"


# Shared by the web tier and the worker --------------------------------------------------------

reply_key = replies.reply_key
encode_public_key = replies.encode_public_key
decode_public_key = replies.decode_public_key
push_reply = replies.push_reply


def rate_key(user_id: str, window: int) -> str:
    return f"lk:rl:reveal:{user_id}:{window}"


def reply_context(org_id: str, secret_id: str, job_id: str) -> bytes:
    """A reply opens only for the request (job) that asked, for that org and secret."""
    return encode_context("reveal", org_id, secret_id, job_id)


def seal_reply(reply_public_key: str, org_id: str, secret_id: str, job_id: str, payload: dict[str, Any]) -> bytes:
    """Worker side: seal a reply (``{"value", "version"}`` or ``{"error"}``) to the request's key."""
    return replies.seal_reply(reply_public_key, reply_context(org_id, secret_id, job_id), payload)


def open_reply(private_key: Any, sealed: CiphertextBytes, org_id: str, secret_id: str, job_id: str) -> dict[str, Any]:
    """Open a reply with the request's private key; CiphertextError/ValueError when it is not one."""
    return replies.open_reply(private_key, sealed, reply_context(org_id, secret_id, job_id))


# Worker side: the controls a compromised web tier cannot switch off ---------------------------

# Codes a worker refuses a reveal with before it resolves anything (the sealed reply's "error").
REVEAL_DISABLED = "reveal_disabled"
RATE_LIMITED = "rate_limited"
LIMITER_UNAVAILABLE = "limiter_unavailable"
# The per-user bucket of jobs that name no user (a forged row may leave created_by empty).
NO_USER = "-"


class RevealRefusedError(WorkerError):
    """The worker refuses this reveal; ``code`` is stable, ``message`` safe to show and to log."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after

    def reply(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"error": self.code}
        if self.retry_after is not None:
            payload["retry_after"] = self.retry_after
        return payload


def worker_rate_key(namespace: str, scope: str, subject: str, window: int) -> str:
    return f"lk:wrl:{namespace}:reveal:{scope}:{subject}:{window}"


class RevealGate:
    """Worker-side reveal controls: the switch and three fixed-window limits, counted twice.

    Every reveal job passes :meth:`admit` before anything is resolved. It is refused when
    reveal is disabled (globally or for the job's org id), or when the instance, the org or the
    requesting user (``created_by`` of the job row: advisory only, a forged row can name anyone)
    is over its limit for the current window. Counted in two places, and refused if either is
    over: the worker's Redis (``LATCHKEY_WORKER_REDIS_URL``, shared by all workers) and this
    process's memory, which no Redis writer can reset (so each worker process still enforces
    every limit on its own). Redis unreachable: refused (``limiter_unavailable``), never unmetered.
    """

    def __init__(
        self,
        *,
        namespace: str,
        disabled: bool,
        disabled_orgs: Iterable[str],
        per_user: int,
        per_org: int,
        instance: int,
        window_seconds: int,
    ) -> None:
        self.namespace = namespace
        self.disabled = disabled
        self.disabled_orgs = frozenset(disabled_orgs)
        self.per_user, self.per_org, self.instance = per_user, per_org, instance
        self.window_seconds = window_seconds
        self._local: dict[tuple[str, str, int], int] = {}
        # Held across the Redis round trip: the check and the count are one step per process.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> RevealGate:
        return cls(
            namespace=settings.queue,
            disabled=settings.reveal_disabled,
            disabled_orgs=settings.reveal_disabled_orgs,
            per_user=settings.reveal_limit_per_user,
            per_org=settings.reveal_limit_per_org,
            instance=settings.reveal_limit_instance,
            window_seconds=settings.reveal_limit_window_seconds,
        )

    def admit(self, client: Redis, org_id: str, user_id: str | None, *, now: float | None = None) -> None:
        """Count one reveal for (instance, org, user), or raise RevealRefusedError (nothing counted)."""
        if self.disabled:
            raise RevealRefusedError(REVEAL_DISABLED, "reveal is disabled on this instance")
        if org_id in self.disabled_orgs:
            raise RevealRefusedError(REVEAL_DISABLED, "reveal is disabled for this org")
        now = time.time() if now is None else now
        window = int(now // self.window_seconds)
        retry_after = max(1, math.ceil((window + 1) * self.window_seconds - now))
        buckets = [
            ("instance", "all", self.instance),
            ("org", org_id, self.per_org),
            ("user", user_id or NO_USER, self.per_user),
        ]
        with self._lock:
            for key in [k for k in self._local if k[2] != window]:
                del self._local[key]
            for scope, subject, limit in buckets:
                if self._local.get((scope, subject, window), 0) >= limit:
                    raise self._limited(scope, limit, retry_after)
            self._count_in_redis(client, buckets, window, retry_after)
            for scope, subject, _limit in buckets:
                self._local[(scope, subject, window)] = self._local.get((scope, subject, window), 0) + 1

    def _count_in_redis(
        self, client: Redis, buckets: list[tuple[str, str, int]], window: int, retry_after: int
    ) -> None:
        keys = [worker_rate_key(self.namespace, scope, subject, window) for scope, subject, _ in buckets]
        try:
            pipe = client.pipeline(transaction=True)
            for key in keys:
                pipe.incr(key)
                pipe.expire(key, self.window_seconds + 60)
            counts = pipe.execute()[0::2]
            over = [(scope, limit) for (scope, _s, limit), n in zip(buckets, counts, strict=True) if int(n) > limit]
            if over:
                # Refused reveals do not use up anyone's budget.
                pipe = client.pipeline(transaction=True)
                for key in keys:
                    pipe.decr(key)
                pipe.execute()
        except RedisError as exc:
            log.error("reveal limiter unavailable: %s", type(exc).__name__)
            raise RevealRefusedError(LIMITER_UNAVAILABLE, "the worker's reveal limiter is unavailable") from None
        if over:
            raise self._limited(over[0][0], over[0][1], retry_after)

    def _limited(self, scope: str, limit: int, retry_after: int) -> RevealRefusedError:
        what = {"instance": "on this instance", "org": "for this org", "user": "for this user"}[scope]
        minutes = self.window_seconds / 60
        return RevealRefusedError(
            RATE_LIMITED,
            f"at most {limit} reveals {what} per {minutes:g} min; try again in {retry_after} s",
            retry_after=retry_after,
        )


# Web side ---------------------------------------------------------------------------------------


def check_rate_limit(client: Redis, user_id: str, limit: int, *, now: float | None = None) -> None:
    """Count one reveal for this user; RateLimitedError (with ``retry_after``) over the limit.

    Fails closed: when Redis cannot count, the reveal is refused with 503.
    """
    now = time.time() if now is None else now
    window = int(now // RATE_WINDOW_SECONDS)
    key = rate_key(user_id, window)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.incr(key)
        # A little past the window, so a key never outlives its use by much nor dies early.
        pipe.expire(key, RATE_WINDOW_SECONDS + 5)
        count, _ = pipe.execute()
    except RedisError as exc:
        log.error("reveal rate limiter unavailable: %s", type(exc).__name__)
        raise ServiceUnavailableError("the reveal rate limiter is unavailable; try again shortly") from None
    if int(count) > limit:
        retry_after = max(1, math.ceil((window + 1) * RATE_WINDOW_SECONDS - now))
        raise RateLimitedError(
            f"at most {limit} reveals per minute; try again in {retry_after} s", retry_after=retry_after
        )


def reveal(
    session: Session,
    ctx: RequestContext,
    access: OrgAccess,
    secret_id: str,
    *,
    redis: Redis,
    timeout: float,
    rate_limit: int,
) -> RevealResult:
    """Reveal a secret's current value through a worker (org admin).

    Commits the session itself: the job row before publishing it, and the ``secret.reveal``
    audit event before the value is returned, so nothing is revealed without being audited.
    """
    access.require_admin()
    secret = secrets.get_secret(session, access, secret_id)
    if ctx.actor.id is None:
        raise UnauthorizedError()
    org_id, sid = access.org.id, secret.id
    check_rate_limit(redis, ctx.actor.id, rate_limit)

    private_key, public_key = replies.new_key_pair()
    job = jobs.create_job(
        session,
        ctx,
        org_id=org_id,
        kind=TaskName.REVEAL_VALUE,
        params={"secret_id": sid, "reply_public_key": public_key},
    )
    job_id = job.id
    # The request waits for the worker, so the job goes out now (on commit), not after the handler.
    session.commit()
    reply = replies.wait_for_reply(
        session, redis, job_id, private_key, reply_context(org_id, sid, job_id), timeout=timeout, what="reveal"
    )
    code = replies.error_code(reply)
    if code is not None:
        if code == "secret_not_found":  # deleted between our check and the worker's read
            raise NotFoundError("secret not found")
        # The worker's own controls (RevealGate): the same answers as the web tier's checks.
        if code == REVEAL_DISABLED:
            raise RevealDisabledError("reveal is disabled for this org by the worker's configuration")
        if code == RATE_LIMITED:
            retry = reply.get("retry_after")
            retry_after = retry if isinstance(retry, int) and not isinstance(retry, bool) and 0 < retry <= 86400 else 60
            raise RateLimitedError(f"too many reveals; try again in {retry_after} s", retry_after=retry_after)
        raise ServiceUnavailableError(f"the worker could not reveal the secret ({code})")
    value, version = reply.get("value"), reply.get("version")
    if not isinstance(value, str) or isinstance(version, bool) or not isinstance(version, int):
        log.error("reveal job %s: malformed reply", job_id)
        raise ServiceUnavailableError("the worker's reply was malformed; try again")

    audit.record(
        session,
        ctx,
        "secret.reveal",
        org_id=org_id,
        target_type="secret",
        target_id=sid,
        details={"version": version, "job_id": job_id},
    )
    session.commit()
    return RevealResult(value, version, job_id)
