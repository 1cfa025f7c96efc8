"""How a job is shown: status, progress, result (never a secret) and error."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from app.models import Job
from app.schemas import Out


class Progress(BaseModel):
    done: int
    total: int | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(Out):
    """``JobOut.model_validate(job)``: the row's flat progress and error columns, nested."""

    id: str
    kind: str
    status: str = Field(description="queued | running | succeeded | failed")
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if not isinstance(data, Job):
            return data
        error = {"code": data.error_code, "message": data.error_message or ""} if data.error_code else None
        progress = {"done": data.progress_done, "total": data.progress_total}
        return {
            **{name: getattr(data, name) for name in cls.model_fields if name not in ("progress", "error")},
            "progress": progress,
            "error": error,
        }
