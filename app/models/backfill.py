"""Backfill verifications: the evidence the contract migration asks for before it drops anything."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id


class BackfillVerification(Base):
    """One run of ``backfill.verify``: what it checked, what failed, and whether it passed.

    ``legacy_rows`` counts the rows that carried legacy data when the run checked them;
    the contract migration compares it with the database as it is then, so rows changed
    after the verification are never dropped unverified.
    """

    __tablename__ = "backfill_verifications"
    __table_args__ = (Index("ix_backfill_verifications_finished_at", "finished_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(String(36))
    passed: Mapped[bool] = mapped_column(Boolean)
    unmigrated: Mapped[int] = mapped_column(Integer)
    legacy_rows: Mapped[dict[str, int]] = mapped_column(JSON)
    # Per kind: checked, matched, edited (changed since the backfill), failed.
    counts: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The first failures: {kind, id, org_id, reason}; never a value.
    failures: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    cache_check: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
