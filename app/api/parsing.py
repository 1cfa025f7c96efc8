"""Reading a request strictly: JSON bodies (bounded depth, no NaN, no coercion) and query strings."""

from __future__ import annotations

from typing import Any

from flask import request
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from app.errors import InvalidJsonError, UnsupportedMediaTypeError, ValidationFailedError
from app.schemas import field_errors

# No request body needs more than a few levels; refusing deeper ones bounds parsing work.
MAX_JSON_DEPTH = 32


def _depth(data: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def load_json(raw: bytes) -> Any:
    """Parse a JSON document, or raise ``invalid_json``: malformed, NaN/Infinity, or nested too deeply.

    pydantic-core's parser stops at 200 levels by itself (a ValueError, never a RecursionError);
    :data:`MAX_JSON_DEPTH` is the limit an API body must keep to.
    """
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise InvalidJsonError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
        raise InvalidJsonError("the body is not valid JSON") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidJsonError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_json_body(model: type[BaseModel]) -> BaseModel:
    """Strictly parse the JSON body: wrong types and unknown fields are 422, never coerced."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaTypeError("send the body as application/json")
    raw = request.get_data(cache=True)
    data = load_json(raw)
    if not isinstance(data, dict):
        raise ValidationFailedError.single("body", "must be a JSON object")
    try:
        # JSON mode: strict types, but ISO-8601 strings are accepted for datetimes.
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc)) from None


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if any("\x00" in v for v in values):
            raise ValidationFailedError.single(f"query.{key}", "must not contain NUL characters")
        args[key] = values[0] if len(values) == 1 else values
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc, "query.")) from None
