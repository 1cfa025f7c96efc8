"""Jobs: the jobs table is the source of truth; Celery only carries the job id.

A service creates the job row and asks for it to be published; the publication happens
after the transaction commits (``publish_pending``), so a worker never sees a job whose
row is not there yet. If the broker refuses the message, the job is marked failed with
``broker_unavailable`` and the caller gets a 503.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.db import Database, new_id, utcnow
from app.errors import BrokerUnavailableError, NotFoundError
from app.models import Job, JobStatus

log = logging.getLogger("latchkey.jobs")

# Jobs still queued after this long were probably never delivered: beat re-publishes them.
STUCK_AFTER = timedelta(minutes=2)
MAX_REQUEUES = 5


@dataclass(frozen=True)
class Publication:
    job_id: str
    task: str


def create_job(
    session: Session,
    ctx: RequestContext,
    *,
    org_id: str | None,
    kind: str,
    params: dict[str, Any] | None = None,
) -> Job:
    """Record a queued job and schedule its publication for after the commit.

    ``kind`` is the Celery task name (``<domain>.<verb_noun>``), so a job can always be
    re-published from its row alone.
    """
    job = Job(
        id=new_id(),
        org_id=org_id,
        kind=kind,
        status=JobStatus.QUEUED.value,
        params=params or {},
        created_by=ctx.actor.id,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(job)
    session.flush()
    session.info.setdefault("publish", []).append(Publication(job.id, kind))
    audit.record(
        session,
        ctx,
        "job.create",
        org_id=org_id,
        target_type="job",
        target_id=job.id,
        details={"kind": kind, "params": params or {}},
    )
    return job


def take_publications(session: Session) -> list[Publication]:
    pubs: list[Publication] = session.info.pop("publish", [])
    return pubs


class Publisher:
    """Sends task messages (ids only) through a Celery app."""

    def __init__(self, celery: Any, db: Database) -> None:
        self.celery = celery
        self.db = db

    def send(self, job_id: str, task: str) -> None:
        self.celery.send_task(
            task,
            args=[job_id],
            task_id=job_id,
            # The jobs table is the result: never touch the result backend (the cache Redis
            # may be down while the broker is up).
            ignore_result=True,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        )

    def publish(self, pubs: list[Publication]) -> None:
        """Publish committed jobs; on a broker failure mark them failed and raise 503."""
        failed: list[Publication] = []
        for pub in pubs:
            try:
                self.send(pub.job_id, pub.task)
            except Exception as exc:  # kombu/redis/amqp all raise their own connection errors
                log.error("broker refused job %s (%s): %s", pub.job_id, pub.task, type(exc).__name__)
                failed.append(pub)
        if failed:
            with self.db.session() as s:
                for pub in failed:
                    mark_failed(s, pub.job_id, "broker_unavailable", "the job queue was unavailable; try again")
            raise BrokerUnavailableError("the job queue is unavailable; the job was not started")


def get_job(session: Session, org_id: str | None, job_id: str) -> Job:
    """A job of this org (or an instance job when ``org_id`` is None); others are not found."""
    stmt = select(Job).where(Job.id == job_id)
    stmt = stmt.where(Job.org_id.is_(None)) if org_id is None else stmt.where(Job.org_id == org_id)
    job = session.scalar(stmt)
    if job is None:
        raise NotFoundError("job not found")
    return job


def list_jobs(session: Session, org_id: str | None, kinds: list[str], *, limit: int = 50) -> list[Job]:
    """The newest jobs of these kinds, of this org (or instance jobs when ``org_id`` is None)."""
    stmt = select(Job).where(Job.kind.in_(kinds))
    stmt = stmt.where(Job.org_id.is_(None)) if org_id is None else stmt.where(Job.org_id == org_id)
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


# Worker-side transitions -------------------------------------------------------------------


def claim(session: Session, job_id: str) -> Job | None:
    """Move a job to running; None when it is already finished (a redelivery: do nothing)."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        return None
    now = utcnow()
    job.status = JobStatus.RUNNING.value
    job.attempts += 1
    job.started_at = job.started_at or now
    job.updated_at = now
    return job


def touch(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))


def set_progress(session: Session, job_id: str, done: int, total: int | None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(progress_done=done, progress_total=total, updated_at=utcnow())
    )


# Only an unfinished job can finish: a late worker cannot overwrite a job the web tier has
# already failed (for instance a reveal that timed out), and a failure cannot undo a success.
_UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _finish(session: Session, job_id: str, status: JobStatus, **values: Any) -> None:
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_UNFINISHED))
        .values(status=status.value, finished_at=now, updated_at=now, **values)
    )


def mark_succeeded(session: Session, job_id: str, result: dict[str, Any] | None) -> None:
    _finish(session, job_id, JobStatus.SUCCEEDED, result=result, error_code=None, error_message=None)


def mark_failed(session: Session, job_id: str, code: str, message: str) -> None:
    _finish(session, job_id, JobStatus.FAILED, error_code=code, error_message=message[:1000])


def record_resolved(session: Session, job_id: str, reads: list[dict[str, Any]]) -> None:
    """Remember which secret ids and versions a job resolved (ids and versions only)."""
    session.execute(update(Job).where(Job.id == job_id).values(resolved_secrets=reads, updated_at=utcnow()))


def stuck_jobs(session: Session, limit: int = 100) -> list[Job]:
    cutoff = utcnow() - STUCK_AFTER
    return list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED.value, Job.updated_at < cutoff)
            .order_by(Job.created_at)
            .limit(limit)
        )
    )
