"""Jobs: the source of truth for background work (Celery's result backend is never shown)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id
from app.models.status import JobStatus, status_type


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_org_id_id", "org_id", "id"),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_parent_id", "parent_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    # NULL for instance-level (operator) jobs such as backfill and reseal.
    org_id: Mapped[str | None] = mapped_column(ForeignKey("orgs.id"))
    kind: Mapped[str] = mapped_column(String(64))
    # A part of a split job (backfill, verify, reseal: app/tasks/split.py): the job it belongs to.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    status: Mapped[JobStatus] = mapped_column(
        status_type(JobStatus, 16), default=JobStatus.QUEUED, server_default=JobStatus.QUEUED.value
    )
    # Ids and plain options only; never a secret value.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    progress_total: Mapped[int | None] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(String(1000))
    # [{"secret_id": ..., "version": ...}] for every secret the job resolved.
    resolved_secrets: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # While running: the worker holding the job and until when (renewed as it runs).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    leased_by: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
