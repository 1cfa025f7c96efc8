"""Keyset (cursor) pagination shared by every list endpoint."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.errors import InvalidCursorError

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps({"k": value}, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    if len(cursor) > 512:
        raise InvalidCursorError("cursor is too long")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidCursorError("cursor is not one this API issued") from None
    if not isinstance(data, dict) or "k" not in data or not isinstance(data["k"], (str, int)):
        raise InvalidCursorError("cursor is not one this API issued")
    return data["k"]


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
    if cursor:
        after = decode_cursor(cursor)
        stmt = stmt.where(key < after if descending else key > after)
    stmt = stmt.order_by(key.desc() if descending else key.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt).all())
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(getattr(rows[-1], key.key)) if more and rows else None
    return Page(rows, next_cursor)
