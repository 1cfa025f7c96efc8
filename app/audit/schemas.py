"""The audit API's models: which events to list, and how one is shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from app.models import AuditEvent
from app.schemas import Out, Strict, UtcDateTime


class AuditFilter(Strict):
    action: str | None = Field(default=None, max_length=64)
    target_type: str | None = Field(default=None, max_length=32)
    target_id: str | None = Field(default=None, max_length=64)
    since: UtcDateTime | None = None


class Ref(BaseModel):
    type: str | None
    id: str | None


class AuditEventOut(Out):
    """``AuditEventOut.model_validate(event)``: the row's actor and target columns as (type, id) pairs."""

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

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any) -> Any:
        if not isinstance(data, AuditEvent):
            return data
        return {
            **{name: getattr(data, name) for name in cls.model_fields if name not in ("actor", "target")},
            "actor": {"type": data.actor_type, "id": data.actor_id},
            "target": {"type": data.target_type, "id": data.target_id},
        }


class AuditEventList(Out):
    items: list[AuditEventOut]
    next_cursor: str | None
