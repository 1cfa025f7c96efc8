"""Keyset (cursor) pagination shared by every list endpoint.

A cursor is ``<payload>.<tag>``: the base64url JSON of the last key of a page, and an HMAC
(keyed from the app's secret key) over that payload and the list it belongs to. A cursor
that was altered, forged, or issued by another list is refused (``invalid_cursor``) before
any query runs; the decoded key is then checked against the key column's type and range,
so nothing a client sends reaches the database as a mistyped comparison.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from flask import current_app
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import InvalidCursorError

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_CURSOR = 512
# Both halves are unpadded base64url; the tag is 16 bytes (22 characters).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,480}\.[A-Za-z0-9_-]{22}$"
_TAG_BYTES = 16
_MAX_KEY_CHARS = 255
_INT64 = (-(2**63), 2**63 - 1)
_NOT_OURS = "cursor is not one this API issued for this list"


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def cursor_key(secret_key: str) -> bytes:
    """The cursor signing key, derived from the app's secret key (one purpose, one key)."""
    return hmac.new(secret_key.encode(), b"latchkey/cursor/v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _tag(scope: str, payload: str) -> bytes:
    key: bytes = current_app.config["LATCHKEY_CURSOR_KEY"]
    return hmac.new(key, f"{scope}\n{payload}".encode(), hashlib.sha256).digest()[:_TAG_BYTES]


def _scope(key: InstrumentedAttribute[Any], descending: bool) -> str:
    return f"{key.class_.__tablename__}.{key.key}.{'desc' if descending else 'asc'}"


def encode_cursor(value: Any, scope: str) -> str:
    payload = _b64(json.dumps({"k": value}, separators=(",", ":")).encode())
    return f"{payload}.{_b64(_tag(scope, payload))}"


def decode_cursor(cursor: str, scope: str) -> Any:
    """The key a cursor carries, once its tag proves this API issued it for ``scope``."""
    if len(cursor) > MAX_CURSOR:
        raise InvalidCursorError("cursor is too long")
    payload, dot, tag = cursor.partition(".")
    try:
        given = _unb64(tag) if dot else b""
    except (binascii.Error, ValueError):
        given = b""
    if not hmac.compare_digest(given, _tag(scope, payload)):
        raise InvalidCursorError(_NOT_OURS)
    try:
        data = json.loads(_unb64(payload))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidCursorError(_NOT_OURS) from None
    if not isinstance(data, dict) or set(data) != {"k"}:
        raise InvalidCursorError(_NOT_OURS)
    return data["k"]


def _check_key(value: Any, key: InstrumentedAttribute[Any]) -> Any:
    """Refuse a decoded key that the key column could not hold (type and range)."""
    python_type = key.type.python_type
    if python_type is int:
        if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
            raise InvalidCursorError(_NOT_OURS)
    elif python_type is str:
        length = getattr(key.type, "length", None) or _MAX_KEY_CHARS
        if type(value) is not str or not 0 < len(value) <= length or "\x00" in value:
            raise InvalidCursorError(_NOT_OURS)
    else:  # pragma: no cover - a new key type must be taught here first
        raise TypeError(f"cursor pagination does not support {python_type.__name__} keys")
    return value


def paginate(
    session: Session,
    stmt: Select[Any],
    key: InstrumentedAttribute[Any],
    *,
    limit: int,
    cursor: str | None,
    descending: bool = False,
) -> Page[Any]:
    """Run ``stmt`` ordered by ``key`` (unique), one page at a time."""
    scope = _scope(key, descending)
    if cursor is not None:  # an empty cursor is not the first page: no page issues one
        after = _check_key(decode_cursor(cursor, scope), key)
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt).all())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(getattr(rows[-1], key.key), scope) if more and rows else None
    return Page(rows, next_cursor)
