"""API-only models: list paging, and the envelopes of API answers. Domain models live in their packages."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.audit.schemas import AuditFilter
from app.jobs.schemas import JobOut
from app.pagination import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_CURSOR, MAX_LIMIT
from app.schemas import Strict


class ListQuery(Strict):
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    # Declared with its shape, checked (with its signature) by app.pagination: any bad cursor is
    # one answer, 400 invalid_cursor, rather than a 422 for some shapes and a 400 for others.
    cursor: str | None = Field(
        default=None,
        description="Opaque: the next_cursor of the previous page, unchanged (signed; any other is a 400).",
        json_schema_extra={"pattern": CURSOR_PATTERN, "maxLength": MAX_CURSOR},
    )


# Audit -----------------------------------------------------------------------------------


class AuditQuery(AuditFilter, ListQuery):
    """A page of audit events matching the filter."""


# Jobs ------------------------------------------------------------------------------------


class JobAccepted(BaseModel):
    job: JobOut
