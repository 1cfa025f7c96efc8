"""From a submitted form to an operation's input model: the same model, and the same rules, as the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.api.framework import field_errors
from app.errors import ValidationFailedError

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: Mapping[str, Any], *, blank_is_none: tuple[str, ...] = ()) -> M:
    """``model`` built from form values; a refusal is the API's 422 (``form_errors`` places it).

    A form field cannot be null or left out: the names in ``blank_is_none`` are optional fields
    whose empty input means "none".
    """
    data = {k: (None if k in blank_is_none and v == "" else v) for k, v in values.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc)) from None
