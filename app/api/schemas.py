"""Request and response models: they validate input and generate the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.pagination import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_CURSOR, MAX_LIMIT
from app.schemas import Strict, UtcDateTime


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


class AuditQuery(ListQuery):
    action: str | None = Field(default=None, max_length=64)
    target_type: str | None = Field(default=None, max_length=32)
    target_id: str | None = Field(default=None, max_length=64)
    since: UtcDateTime | None = None


class Ref(BaseModel):
    type: str | None
    id: str | None


class AuditEventOut(BaseModel):
    id: str
    seq: int
    at: datetime
    actor: Ref
    action: str
    target: Ref
    request_id: str | None
    ip: str | None
    details: dict[str, Any]
    hash: str
    prev_hash: str


class AuditEventList(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None


# Jobs ------------------------------------------------------------------------------------


class Progress(BaseModel):
    done: int
    total: int | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: str = Field(description="queued | running | succeeded | failed")
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobAccepted(BaseModel):
    job: JobOut


# Health ----------------------------------------------------------------------------------


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
