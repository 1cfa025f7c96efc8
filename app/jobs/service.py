"""Jobs: the jobs table is the source of truth; Celery only carries the job id.

A service creates the job row and asks for it to be published; the publication happens
after the transaction commits (``app.db.UnitOfWork``), so a worker never sees a job whose
row is not there yet. If the broker refuses the message, the job is marked failed with
``broker_unavailable`` and the caller gets a 503.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal, or_, select, update
from sqlalchemy.orm import Session

from app import broker
from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.db import Database, UTCDateTime, defer, new_id, updated, utcnow
from app.errors import BrokerUnavailableError, NotFoundError
from app.models import Job, JobStatus

log = logging.getLogger("latchkey.jobs")

# Jobs still queued after this long were probably never delivered: beat re-publishes them.
STUCK_AFTER = timedelta(minutes=2)


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
    publish: bool = True,
) -> Job:
    """Record a queued job and schedule its publication for after the commit.

    ``publish=False`` records a job this process runs itself (the CLI's backfill): no message.

    ``kind`` is the Celery task name (``<domain>.<verb_noun>``), so a job can always be
    re-published from its row alone.
    """
    job = Job(
        id=new_id(),
        org_id=org_id,
        kind=kind,
        status=JobStatus.QUEUED,
        params=params or {},
        created_by=ctx.actor.id,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(job)
    session.flush()
    if publish:
        defer(session, "publish", Publication(job.id, kind))
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
            # RabbitMQ: wait (boundedly) for the broker's confirm, so a refused or blocked publish
            # fails this request with broker_unavailable instead of losing the message or hanging.
            **broker.publish_options(self.celery.conf.broker_url),
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


def get_org_job(session: Session, access: OrgAccess, job_id: str) -> Job:
    """A job of the caller's org (any member may follow it)."""
    return get_job(session, access.org.id, job_id)


def list_jobs(session: Session, org_id: str | None, kinds: Sequence[str], *, limit: int = 50) -> list[Job]:
    """The newest jobs of these kinds, of this org (or instance jobs when ``org_id`` is None)."""
    stmt = select(Job).where(Job.kind.in_(kinds))
    stmt = stmt.where(Job.org_id.is_(None)) if org_id is None else stmt.where(Job.org_id == org_id)
    return list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


# Worker-side transitions -------------------------------------------------------------------
#
# A worker holds a running job through a lease: ``leased_by`` names the holder (one id per
# claim) and ``lease_expires_at`` says until when. Every transition a worker makes is one
# conditional UPDATE, so two workers can never both believe they hold a job.


def claim(
    session: Session,
    job_id: str,
    worker_id: str = "local",
    lease_seconds: float | None = None,
    *,
    max_attempts: int | None = None,
) -> Job | None:
    """Take a job: ``queued``, or ``running`` with an expired lease, and under the attempts cap.

    One conditional UPDATE: the job becomes ``running``, held by ``worker_id`` until
    ``lease_seconds`` from now (``None``: no expiry, for a job run in-process such as the CLI's
    backfill, which no sweep may take away), with ``attempts + 1``. None when nothing matched:
    the job is finished, running under a live lease elsewhere, or out of attempts.
    """
    now = utcnow()
    takeable = or_(
        Job.status == JobStatus.QUEUED,
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )
    stmt = update(Job).where(Job.id == job_id, takeable)
    if max_attempts is not None:
        stmt = stmt.where(Job.attempts < max_attempts)
    expires = None if lease_seconds is None else now + timedelta(seconds=lease_seconds)
    claimed = session.scalars(
        stmt.values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            leased_by=worker_id,
            lease_expires_at=expires,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
            updated_at=now,
        )
        .returning(Job)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).one_or_none()
    return claimed


def _held(job_id: str, worker_id: str) -> Any:
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.leased_by == worker_id)


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease while ``worker_id`` still holds the running job; False once it does not."""
    now = utcnow()
    return bool(
        updated(
            session,
            update(Job)
            .where(_held(job_id, worker_id))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now),
        )
    )


def hold(session: Session, job_id: str, worker_id: str) -> bool:
    """Lock the job row while ``worker_id`` still holds it, for the rest of the transaction.

    A task takes this at the start of the transaction that records its outcome (the run row,
    the server's status): while it is held, no sweep can re-queue the job and no other
    worker can claim it, so a worker that lost its lease cannot overwrite what the new
    holder writes. False when the job is no longer ours.
    """
    row = session.execute(select(Job.id).where(_held(job_id, worker_id)).with_for_update()).first()
    return row is not None


def release(session: Session, job_id: str, worker_id: str) -> bool:
    """Give a held job back to ``queued`` (a retry is coming); False when it was not held."""
    return bool(
        updated(
            session,
            update(Job)
            .where(_held(job_id, worker_id))
            .values(status=JobStatus.QUEUED, leased_by=None, lease_expires_at=None, updated_at=utcnow()),
        )
    )


def touch(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))


def set_progress(session: Session, job_id: str, done: int, total: int | None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(progress_done=done, progress_total=total, updated_at=utcnow())
    )


# Only an unfinished job can finish: a late worker cannot overwrite a job the web tier has
# already failed (for instance a reveal that timed out), and a failure cannot undo a success.
# A worker passes its lease: then only the current holder of the running job can finish it,
# so a worker whose lease was taken over (it stalled past the lease) cannot finish it too.
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _finish(session: Session, job_id: str, status: JobStatus, lease: str | None, **values: Any) -> bool:
    now = utcnow()
    where = _held(job_id, lease) if lease is not None else and_(Job.id == job_id, Job.status.in_(_UNFINISHED))
    return bool(
        updated(
            session,
            update(Job)
            .where(where)
            .values(status=status, finished_at=now, updated_at=now, lease_expires_at=None, **values),
        )
    )


def mark_succeeded(session: Session, job_id: str, result: dict[str, Any] | None, *, lease: str | None = None) -> bool:
    """Finish a job as succeeded; False when it was already finished (or, given ``lease``, not held)."""
    return _finish(session, job_id, JobStatus.SUCCEEDED, lease, result=result, error_code=None, error_message=None)


def mark_failed(session: Session, job_id: str, code: str, message: str, *, lease: str | None = None) -> bool:
    """Finish a job as failed with a stable code; False as for ``mark_succeeded``."""
    return _finish(session, job_id, JobStatus.FAILED, lease, error_code=code, error_message=message[:1000])


def record_resolved(session: Session, job_id: str, reads: list[dict[str, Any]]) -> None:
    """Remember which secret ids and versions a job resolved (ids and versions only)."""
    session.execute(update(Job).where(Job.id == job_id).values(resolved_secrets=reads, updated_at=utcnow()))


def stuck_jobs(session: Session, limit: int = 100) -> list[Job]:
    cutoff = utcnow() - STUCK_AFTER
    return list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED, Job.updated_at < cutoff)
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


@dataclass(frozen=True)
class Sweep:
    requeued: list[Publication]
    lost: list[str]


def _lapsed(now: datetime, legacy_after: timedelta) -> Any:
    """Running jobs whose holder stopped renewing: the lease ran out, or (rows claimed before
    leases existed: no lease, no holder) nothing touched them for longer than any task may run."""
    return and_(
        Job.status == JobStatus.RUNNING,
        or_(
            Job.lease_expires_at < now,
            and_(Job.lease_expires_at.is_(None), Job.leased_by.is_(None), Job.updated_at < now - legacy_after),
        ),
    )


def sweep_leases(session: Session, *, max_attempts: int, legacy_after: timedelta, limit: int = 100) -> Sweep:
    """Recover jobs whose worker died: back to ``queued`` (to be re-published after the commit)
    while attempts remain, else ``failed`` with ``worker_lost``; ``queued`` jobs already at the
    cap fail with ``attempts_exhausted``.

    Each row moves with a conditional UPDATE that re-checks the lapse, so a worker that claims
    or renews the job meanwhile wins, and two sweeps never both re-queue one job.
    """
    now = utcnow()
    rows = session.execute(
        select(Job.id, Job.kind, Job.attempts).where(_lapsed(now, legacy_after)).order_by(Job.created_at).limit(limit)
    ).all()
    requeued: list[Publication] = []
    lost: list[str] = []
    for job_id, kind, attempts in rows:
        base = update(Job).where(Job.id == job_id, _lapsed(now, legacy_after), Job.attempts == attempts)
        if attempts < max_attempts:
            if updated(
                session,
                base.values(status=JobStatus.QUEUED, leased_by=None, lease_expires_at=None, updated_at=now),
            ):
                requeued.append(Publication(job_id, kind))
        else:
            if updated(
                session,
                base.values(
                    status=JobStatus.FAILED,
                    lease_expires_at=None,
                    error_code="worker_lost",
                    error_message=f"the worker running this job stopped responding ({attempts} attempts)",
                    finished_at=now,
                    updated_at=now,
                ),
            ):
                lost.append(job_id)
    # Queued jobs that can never be claimed again (the cap was lowered under them) end here
    # too, instead of being re-sent by requeue_stuck forever.
    exhausted = session.execute(
        update(Job)
        .where(Job.status == JobStatus.QUEUED, Job.attempts >= max_attempts)
        .values(
            status=JobStatus.FAILED,
            error_code="attempts_exhausted",
            error_message=f"the job was already tried {max_attempts} times or more",
            finished_at=now,
            updated_at=now,
        )
        .returning(Job.id)
    )
    lost.extend(exhausted.scalars())
    for job_id in lost:
        log.error("job %s failed: out of attempts (its worker was lost each time)", job_id)
    return Sweep(requeued, lost)
