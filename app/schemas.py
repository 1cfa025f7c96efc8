"""Building blocks of every input and output model (API bodies, UI forms, service inputs).

Domain packages keep their own models in ``app/<domain>/schemas.py``; these are the shared
parts: strictness, the one way a datetime is accepted, how a rule refuses a value and the rule
of a display name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_RFC3339_PREFIX = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}")


def _rfc3339_only(value: Any) -> Any:
    # Parsed here, in one way for JSON bodies and query strings alike: pydantic's lax mode
    # (query strings) would otherwise take "0.5" as a Unix timestamp.
    if not isinstance(value, str):
        return value
    try:
        if not _RFC3339_PREFIX.match(value):
            raise ValueError
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an RFC 3339 date-time with an offset, like 2030-01-01T00:00:00Z") from None


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # e.g. 9999-12-31T23:59:59-14:00: a valid offset, but no UTC instant a datetime can hold.
        raise ValueError("is out of range once converted to UTC") from None


UtcDateTime = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only), AfterValidator(_to_utc)]
"""Every datetime *input*: an RFC 3339 timestamp with an offset (naive ones are refused), in UTC."""


def refuse(message: str) -> PydanticCustomError:
    """A field rule's refusal, for a validator to raise: rendered exactly as ``message``.

    (A plain ``ValueError`` would reach the client as "Value error, <message>".)
    """
    return PydanticCustomError("invalid", message)


def trimmed_name(max_length: int) -> Callable[[str | None], str]:
    """The rule of a display name: 1 to ``max_length`` characters once trimmed, no NUL; kept trimmed.

    It takes ``None`` too, so that a PATCH field set to null is refused with the same message.
    """

    def check(value: str | None) -> str:
        if value is None or not value.strip() or len(value) > max_length or "\x00" in value:
            raise refuse(f"must be 1 to {max_length} characters")
        return value.strip()

    return check
