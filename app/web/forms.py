"""Form plumbing shared by the pages: errors next to their fields, re-rendering an invalid form, form values."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import render_template

from app.api.request import session
from app.errors import LatchkeyError, ValidationFailedError


def form_errors(exc: LatchkeyError, fields: Iterable[str], rename: dict[str, str] | None = None) -> dict[str, str]:
    """Turn a service error into messages next to the form's fields (``_general``: no field of this form)."""
    known = set(fields)
    rename = rename or {}
    out: dict[str, str] = {}
    items = [(e.field, e.message) for e in exc.errors] if isinstance(exc, ValidationFailedError) else [("", exc.detail)]
    for field, message in items:
        # "config.base_url" -> base_url, "allowed_hosts.0" / "tools.1.tool_name" -> their list field.
        parts = field.split(".")
        candidates = [rename.get(field, field), parts[-1], rename.get(parts[0], parts[0])]
        name = next((c for c in candidates if c in known), "_general")
        out.setdefault(name, message)
    return out


def invalid(template: str, status: int, **context: Any) -> tuple[str, int]:
    """Re-render a form after a refused change: the unit of work is rolled back first."""
    session().rollback()
    return render_template(template, **context), status


def int_or_none(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit() or len(value.strip()) > 12:
        return None
    return int(value.strip())
