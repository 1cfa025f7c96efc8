"""Sealed replies: a worker answers the one web request that waits for it (reveal, MCP connect).

The request makes a one-request X25519 key pair and puts only the public half in its job's
params. The worker seals its answer to that key, bound to a context naming the request (its
job id among others), and pushes it to ``lk:reveal:{job_id}`` (a short TTL). The request pops it
(BLPOP) until its timeout and opens it with the private key, which never leaves its frame.
Redis and the broker only ever carry the sealed reply.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from typing import Any

from redis import Redis, RedisError
from sqlalchemy.orm import Session

from app.errors import ServiceUnavailableError, WorkerError, WorkerUnavailableError
from app.jobs import service as jobs
from app.secrets.sealing import CiphertextBytes, CiphertextError, generate_ephemeral, open_with, seal_to

log = logging.getLogger("latchkey.replies")

# How long a sealed reply waits in Redis for the request that asked for it.
REPLY_TTL_SECONDS = 60
# Never block on Redis for longer than this share of the client's socket timeout.
_WAIT_SLICE_SHARE = 0.5
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")

__all__ = [
    "REPLY_TTL_SECONDS",
    "ReplyUnavailableError",
    "decode_public_key",
    "encode_public_key",
    "error_code",
    "hand_over",
    "new_key_pair",
    "open_reply",
    "push_reply",
    "reply_key",
    "seal_reply",
    "wait_for_reply",
]


def reply_key(job_id: str) -> str:
    return f"lk:reveal:{job_id}"


def encode_public_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_key_pair() -> tuple[Any, str]:
    """A one-request key pair: the private key (keep it in the frame) and the public key for the job."""
    private_key, public_raw = generate_ephemeral()
    return private_key, encode_public_key(public_raw)


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


def seal_reply(reply_public_key: str, context: bytes, payload: dict[str, Any]) -> bytes:
    """Worker side: seal a JSON reply to the request's key, bound to ``context``."""
    plaintext = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return seal_to(decode_public_key(reply_public_key), plaintext, context)


def push_reply(client: Redis, job_id: str, sealed: bytes) -> None:
    """Worker side: hand the sealed reply over; it expires if nobody is waiting any more."""
    pipe = client.pipeline(transaction=True)
    pipe.rpush(reply_key(job_id), sealed)
    pipe.expire(reply_key(job_id), REPLY_TTL_SECONDS)
    pipe.execute()


class ReplyUnavailableError(WorkerError):
    """The worker could not hand its sealed reply over (Redis down): the job may try again."""

    def __init__(self, cause: str) -> None:
        super().__init__("reply_unavailable", f"could not hand the reply over ({cause})")


def hand_over(redis_url: str, job_id: str, sealed: bytes) -> None:
    """Worker side: push a sealed reply on a connection of its own; ReplyUnavailableError when Redis is down."""
    client = Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        push_reply(client, job_id, sealed)
    except RedisError as exc:
        raise ReplyUnavailableError(type(exc).__name__) from None
    finally:
        client.close()


def _blpop(client: Redis, key: str, timeout: float) -> bytes | None:
    """BLPOP the reply until ``timeout``; None when nothing came.

    The wait is cut into slices shorter than the client's socket timeout, so a long wait never
    trips the socket timeout of a client shared with fast commands.
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


def open_reply(private_key: Any, sealed: CiphertextBytes, context: bytes) -> dict[str, Any]:
    """Open a reply with the request's private key; CiphertextError/ValueError when it is not one."""
    plaintext = open_with(private_key, sealed, context)
    reply = json.loads(plaintext.decode("utf-8"))
    if not isinstance(reply, dict):
        raise ValueError("reply is not an object")
    return reply


def _fail(session: Session, job_id: str, code: str, message: str) -> None:
    jobs.mark_failed(session, job_id, code, message)
    session.commit()


def wait_for_reply(
    session: Session, redis: Redis, job_id: str, private_key: Any, context: bytes, *, timeout: float, what: str
) -> dict[str, Any]:
    """Web side: wait for the worker's sealed reply to the (committed, published) job and open it.

    No answer in time: the job is failed ``worker_unavailable`` and 503 ``worker_unavailable``
    is raised; Redis or a reply that does not open: 503. ``what`` names the operation in messages.
    """
    key = reply_key(job_id)
    try:
        sealed = _blpop(redis, key, timeout)
    except RedisError as exc:
        log.error("%s job %s: reply channel unavailable: %s", what, job_id, type(exc).__name__)
        _fail(session, job_id, "unavailable", f"the {what} reply channel was unavailable")
        raise ServiceUnavailableError(f"the {what} reply channel is unavailable; try again shortly") from None
    if sealed is None:
        log.warning("%s job %s: no worker answered within %.1f s", what, job_id, timeout)
        _fail(session, job_id, "worker_unavailable", f"no worker answered the {what} in time")
        raise WorkerUnavailableError(f"no worker answered within {timeout:g} s; try again")
    try:
        # A redelivered job may have pushed a second (sealed) reply: drop it with the key.
        redis.delete(key)
    except RedisError:
        pass  # it expires on its own
    try:
        return open_reply(private_key, sealed, context)
    except (CiphertextError, ValueError):
        log.error("%s job %s: the reply did not open", what, job_id)
        raise ServiceUnavailableError("the worker's reply could not be opened; try again") from None


def error_code(reply: dict[str, Any]) -> str | None:
    """The reply's error code (a safe identifier, else ``error``), or None for an answer."""
    if "error" not in reply:
        return None
    given = reply["error"]
    return given if isinstance(given, str) and ERROR_CODE_RE.fullmatch(given) else "error"
