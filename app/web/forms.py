"""A submitted form as a domain input model: the UI validates with the same models as the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from app.api.framework import _field_errors
from app.errors import ValidationFailedError

M = TypeVar("M", bound=BaseModel)


def parse_form(model: type[M], data: Mapping[str, Any]) -> M:
    """``model`` from the form's fields, or the 422 the API would give (``form_errors`` renders it)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailedError(_field_errors(exc)) from None
