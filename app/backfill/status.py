"""Where the legacy migration stands: rows left, the latest backfill run and verification.

Its own module because it reads both jobs' results: the backfill (``service``) and the
verification (``verify``, which uses the backfill's parsing), so neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.backfill import legacy, verify
from app.jobs.names import TaskName
from app.models import Job


@dataclass
class Status:
    legacy_columns: bool
    remaining: dict[str, int]
    latest_run: Job | None
    latest_verification: dict[str, Any] | None


def status(session: Session) -> Status:
    """Where the migration stands (the CLI's ``backfill status``, the operator API and page)."""
    run = session.scalar(
        select(Job)
        .where(Job.kind == TaskName.BACKFILL, Job.org_id.is_(None))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    )
    record = verify.latest(session)
    return Status(
        legacy_columns=legacy.present(session, refresh=True),
        remaining=legacy.pending_counts(session),
        latest_run=run,
        latest_verification=verify.as_dict(record) if record else None,
    )
