"""``Idempotency-Key``: a repeated request replays the first answer; a different one with the same key is refused.

The stored digest is keyed (HMAC) and leaves secret values out, so it cannot verify guesses of them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

from flask import Response, current_app, request
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.api.parsing import load_json
from app.api.request import current_user
from app.api.responses import json_response
from app.db import utcnow
from app.errors import BadRequestError, FieldError, IdempotencyKeyReusedError, InvalidJsonError
from app.models import IdempotencyKey, User

MAX_IDEMPOTENCY_KEY = 255

# Body fields that carry a secret value: never part of an idempotency digest.
SECRET_BODY_FIELDS = ("value", "sealed_value")


def _digested_body() -> bytes:
    """The body as the idempotency digest sees it: secret-value fields replaced by a marker.

    A stored digest must not be a verifier for guesses of a secret value, so ``value`` and
    ``sealed_value`` are left out; the marker keeps *whether* they were sent. A repeat that
    differs only in the value therefore replays the first answer (docs/api.md).
    """
    raw = request.get_data(cache=True)
    try:
        data = load_json(raw)
    except InvalidJsonError:
        return raw
    if not isinstance(data, dict) or not any(f in data for f in SECRET_BODY_FIELDS):
        return raw
    masked = {k: ("<secret>" if k in SECRET_BODY_FIELDS else v) for k, v in data.items()}
    return json.dumps(masked, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def request_digest() -> str:
    key = current_app.config["LATCHKEY_IDEMPOTENCY_KEY"]
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(request.method.encode() + b" " + request.path.encode() + b"\n")
    mac.update(_digested_body())
    return mac.hexdigest()


def replay(record: IdempotencyKey, digest: str) -> Response:
    if not hmac.compare_digest(record.request_hmac, digest):
        raise IdempotencyKeyReusedError([FieldError("Idempotency-Key", "was already used with a different request")])
    resp = json_response(record.response_body, record.status_code)
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def find_record(s: Session, user: User, key: str) -> IdempotencyKey | None:
    return s.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.user_id == user.id, IdempotencyKey.key == key, IdempotencyKey.expires_at > utcnow()
        )
    )


def header_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise BadRequestError(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


def remember(s: Session, key: str, digest: str, status_code: int, payload: Any) -> None:
    user = current_user()
    ttl = timedelta(seconds=current_app.config["LATCHKEY_SETTINGS"].idempotency_ttl_seconds)
    now = utcnow()
    # Expired keys of this user are dropped here, so the table stays bounded without a sweeper.
    s.execute(delete(IdempotencyKey).where(IdempotencyKey.user_id == user.id, IdempotencyKey.expires_at <= now))
    s.add(
        IdempotencyKey(
            user_id=user.id,
            key=key,
            request_hmac=digest,
            status_code=status_code,
            response_body=payload,
            expires_at=now + ttl,
        )
    )
    s.flush()
