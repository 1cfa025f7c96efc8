"""The parts of a split job (child job rows, ``parent_id``): which one to take next, how far they got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from app.db import utcnow
from app.jobs import service as jobs
from app.models import Job, JobStatus


@dataclass(frozen=True)
class Tally:
    parts: int
    unfinished: int
    rows_done: int
    rows_total: int


def count(session: Session, parent_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.parent_id == parent_id)) or 0)


def _open(max_attempts: int) -> Any:
    """Parts someone may still finish: queued or running, under the attempts cap."""
    return and_(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.attempts < max_attempts)


def takeable(session: Session, parent_id: str, *, max_attempts: int) -> str | None:
    """A part nobody holds (queued, or running with a lapsed lease), first planned first; None if none."""
    return session.scalar(
        select(Job.id)
        .where(Job.parent_id == parent_id, Job.attempts < max_attempts, jobs.takeable(utcnow()))
        .order_by(Job.id)
        .limit(1)
    )


def tally(session: Session, parent_id: str, *, max_attempts: int) -> Tally:
    """How many parts there are, how many may still finish, and their rows done out of planned.

    A part queued at the attempts cap is not counted as unfinished: nobody may take it (the
    sweep fails it with ``attempts_exhausted``), so the split job stops waiting for it.
    """
    row = session.execute(
        select(
            func.count(),
            func.count().filter(_open(max_attempts)),
            func.coalesce(func.sum(Job.progress_done), 0),
            func.coalesce(func.sum(Job.progress_total), 0),
        ).where(Job.parent_id == parent_id)
    ).one()
    return Tally(*(int(v or 0) for v in row))


def finished(session: Session, parent_id: str) -> list[Job]:
    """Every part, in the order planned (detached, for the merge)."""
    found = list(session.scalars(select(Job).where(Job.parent_id == parent_id).order_by(Job.id)))
    for job in found:
        session.expunge(job)
    return found


def saved_state(session: Session, part_id: str) -> dict[str, Any] | None:
    """The running totals a part's earlier attempts committed (None before its first checkpoint)."""
    return session.scalar(select(Job.result).where(Job.id == part_id))


def process_of(holder: str | None) -> str:
    """``node:pid`` of a lease holder (``node:pid:random[/part]``)."""
    return ":".join((holder or "?").split(":")[:2])
