"""Building blocks of every input and output model (API bodies, UI forms, service inputs).

Domain packages keep their own models in ``app/<domain>/schemas.py``; these are the shared
parts: strictness, the one way a datetime is accepted, how a rule refuses a value and the rule
of a display name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from app.errors import FieldError, ValidationFailedError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Patch(Strict):
    """A partial update: only the fields sent change (``model_dump(exclude_unset=True)``), and at
    least one must be sent. ``NOTHING_TO_CHANGE`` is the message an empty body gets."""

    NOTHING_TO_CHANGE: ClassVar[str] = "give at least one field to change"

    @model_validator(mode="after")
    def _something_to_change(self) -> Self:
        if not self.model_fields_set:
            raise refuse(self.NOTHING_TO_CHANGE)
        return self


class Out(BaseModel):
    """An output model read from a row's attributes, plus what the row does not hold itself."""

    model_config = ConfigDict(from_attributes=True)

    @classmethod
    def of(cls, row: object, **extra: Any) -> Self:
        """``cls`` from ``row``'s attributes of the same names, and ``extra`` for the rest."""
        fields = {name: getattr(row, name) for name in cls.model_fields if name not in extra}
        return cls.model_validate({**fields, **extra})


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    """pydantic's errors as a 422's ``errors`` list: dotted field names, "unknown field" for extras."""
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        out.append(FieldError(prefix + loc, message))
    return out


def validated(model: type[M], data: Mapping[str, Any], *, blank_is_none: tuple[str, ...] = ()) -> M:
    """``model`` from plain data (a UI form, CLI arguments), or the 422 the API would answer.

    A form field cannot be null or left out: the names in ``blank_is_none`` are optional fields
    whose empty input means "none".
    """
    data = {k: (None if k in blank_is_none and v == "" else v) for k, v in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc)) from None


def checked(rule: Callable[[T], T]) -> AfterValidator:
    """A domain rule (``app/<domain>/catalog.py``) as a field validator.

    The rule raises ValueError with the message a client sees; pydantic would prefix it with
    "Value error, ", so it is re-raised as the field's error, word for word.
    """

    def check(value: T) -> T:
        try:
            return rule(value)
        except ValueError as exc:
            raise refuse(str(exc)) from None

    return AfterValidator(check)


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
    return PydanticCustomError("value_error", message)


def trimmed_name(max_length: int) -> Callable[[str | None], str]:
    """The rule of a display name: 1 to ``max_length`` characters once trimmed, no NUL; kept trimmed.

    It takes ``None`` too, so that a PATCH field set to null is refused with the same message.
    """

    def check(value: str | None) -> str:
        if value is None or not value.strip() or len(value) > max_length or "\x00" in value:
            raise refuse(f"must be 1 to {max_length} characters")
        return value.strip()

    return check
