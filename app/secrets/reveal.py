"""Reveal: an org admin reads a secret's value, and the web tier still cannot open storage.

One request does all of it:

1. the secret must exist in the org (404 otherwise), checked before anything is counted or
   queued;
2. the caller's per-user rate limit: a fixed window in Redis (``lk:rl:reveal:{user}:{window}``);
   it fails closed, because a reveal must never go unmetered;
3. a one-request X25519 key pair; a ``secrets.reveal_value`` job carrying the secret id and the
   reply *public* key is committed and published at once (the request waits for the answer,
   so publishing cannot be left to the framework's after-commit step);
4. a worker resolves the secret, seals ``{"value", "version"}`` to the reply key, bound to
   (org, secret, job), and pushes it to ``lk:reveal:{job_id}`` (60 s TTL);
5. the request pops that key (BLPOP) until its timeout, opens the reply with the private key,
   which never leaves this function's frame, records ``secret.reveal`` and returns.

Redis (the broker, the reply list) only ever holds the sealed reply; the job row holds the
version, never the value.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis, RedisError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.errors import (
    NotFoundError,
    RateLimitedError,
    ServiceUnavailableError,
    UnauthorizedError,
    WorkerUnavailableError,
)
from app.jobs import service as jobs
from app.jobs.service import Publisher
from app.models import Org
from app.secrets import service as secrets
from app.secrets.sealing import CiphertextBytes, CiphertextError, encode_context, generate_ephemeral, open_with, seal_to

log = logging.getLogger("latchkey.reveal")

REVEAL_TASK = "secrets.reveal_value"
# How long a sealed reply waits in Redis for the request that asked for it.
REPLY_TTL_SECONDS = 60
RATE_WINDOW_SECONDS = 60
# Never block on Redis for longer than this share of the client's socket timeout.
_WAIT_SLICE_SHARE = 0.5
_ERROR_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True)
class RevealResult:
    value: str
    version: int
    job_id: str

    def __repr__(self) -> str:  # never the value
        return f"RevealResult(version={self.version}, job_id={self.job_id!r})"


# Shared by the web tier and the worker --------------------------------------------------------


def reply_key(job_id: str) -> str:
    return f"lk:reveal:{job_id}"


def rate_key(user_id: str, window: int) -> str:
    return f"lk:rl:reveal:{user_id}:{window}"


def reply_context(org_id: str, secret_id: str, job_id: str) -> bytes:
    """A reply opens only for the request (job) that asked, for that org and secret."""
    return encode_context("reveal", org_id, secret_id, job_id)


def encode_public_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: Any) -> bytes:
    """The reply public key from a job's params; ValueError when it is not 32 base64 bytes."""
    if not isinstance(text, str):
        raise ValueError("reply public key must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("reply public key is not valid base64") from None
    if len(raw) != 32:
        raise ValueError("reply public key must be 32 bytes")
    return raw


def seal_reply(reply_public_key: str, org_id: str, secret_id: str, job_id: str, payload: dict[str, Any]) -> bytes:
    """Worker side: seal a reply (``{"value", "version"}`` or ``{"error"}``) to the request's key."""
    plaintext = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return seal_to(decode_public_key(reply_public_key), plaintext, reply_context(org_id, secret_id, job_id))


def push_reply(client: Redis, job_id: str, sealed: bytes) -> None:
    """Worker side: hand the sealed reply over; it expires if nobody is waiting any more."""
    pipe = client.pipeline(transaction=True)
    pipe.rpush(reply_key(job_id), sealed)
    pipe.expire(reply_key(job_id), REPLY_TTL_SECONDS)
    pipe.execute()


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


def _wait_reply(client: Redis, key: str, timeout: float) -> bytes | None:
    """BLPOP the reply until ``timeout``; None when nothing came.

    The wait is cut into slices shorter than the client's socket timeout, so a long reveal
    timeout never trips the socket timeout of a client shared with fast commands.
    """
    socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    slice_max = max(0.05, socket_timeout * _WAIT_SLICE_SHARE) if socket_timeout else timeout
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining < 0.01:  # BLPOP with 0 would block forever
            return None
        item = client.blpop([key], timeout=min(remaining, slice_max))
        if item is not None:
            data = item[1]
            return data.encode("latin-1") if isinstance(data, str) else bytes(data)


def open_reply(private_key: Any, sealed: CiphertextBytes, org_id: str, secret_id: str, job_id: str) -> dict[str, Any]:
    """Open a reply with the request's private key; CiphertextError/ValueError when it is not one."""
    plaintext = open_with(private_key, sealed, reply_context(org_id, secret_id, job_id))
    reply = json.loads(plaintext.decode("utf-8"))
    if not isinstance(reply, dict):
        raise ValueError("reply is not an object")
    return reply


def _fail(session: Session, job_id: str, code: str, message: str) -> None:
    jobs.mark_failed(session, job_id, code, message)
    session.commit()


def reveal(
    session: Session,
    ctx: RequestContext,
    org: Org,
    secret_id: str,
    *,
    publisher: Publisher,
    redis: Redis,
    timeout: float,
    rate_limit: int,
) -> RevealResult:
    """Reveal a secret's current value through a worker (the caller has checked the admin role).

    Commits the session itself: the job row before publishing it, and the ``secret.reveal``
    audit event before the value is returned, so nothing is revealed without being audited.
    """
    secret = secrets.get_secret(session, org, secret_id)
    if ctx.actor.id is None:
        raise UnauthorizedError()
    org_id, sid = org.id, secret.id
    check_rate_limit(redis, ctx.actor.id, rate_limit)

    private_key, public_raw = generate_ephemeral()
    job = jobs.create_job(
        session,
        ctx,
        org_id=org_id,
        kind=REVEAL_TASK,
        params={"secret_id": sid, "reply_public_key": encode_public_key(public_raw)},
    )
    job_id = job.id
    # The request waits for the worker, so the job goes out now, not after the handler.
    session.commit()
    publisher.publish(jobs.take_publications(session))

    key = reply_key(job_id)
    try:
        sealed = _wait_reply(redis, key, timeout)
    except RedisError as exc:
        log.error("reveal job %s: reply channel unavailable: %s", job_id, type(exc).__name__)
        _fail(session, job_id, "unavailable", "the reveal reply channel was unavailable")
        raise ServiceUnavailableError("the reveal reply channel is unavailable; try again shortly") from None
    if sealed is None:
        log.warning("reveal job %s: no worker answered within %.1f s", job_id, timeout)
        _fail(session, job_id, "worker_unavailable", "no worker answered the reveal in time")
        raise WorkerUnavailableError(f"no worker answered within {timeout:g} s; try again")
    try:
        # A redelivered job may have pushed a second (sealed) reply: drop it with the key.
        redis.delete(key)
    except RedisError:
        pass  # it expires on its own

    try:
        reply = open_reply(private_key, sealed, org_id, sid, job_id)
    except (CiphertextError, ValueError):
        log.error("reveal job %s: the reply did not open", job_id)
        raise ServiceUnavailableError("the worker's reply could not be opened; try again") from None
    if "error" in reply:
        code = reply["error"] if isinstance(reply["error"], str) and _ERROR_CODE_RE.match(reply["error"]) else "error"
        if code == "secret_not_found":  # deleted between our check and the worker's read
            raise NotFoundError("secret not found")
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
