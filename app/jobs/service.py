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
from typing import Any, cast

from sqlalchemy import Integer, Row, String, Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.util import identity_key

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


JOBS = cast(Table, Job.__table__)
_INSERT_JOB = insert(JOBS)
# The columns a new job starts with besides those create_job sets.
_NEW_JOB: dict[str, Any] = {
    "status": JobStatus.QUEUED,
    "progress_done": 0,
    "progress_total": None,
    "result": None,
    "error_code": None,
    "error_message": None,
    "resolved_secrets": None,
    "attempts": 0,
    "lease_expires_at": None,
    "leased_by": None,
    "started_at": None,
    "finished_at": None,
}


def create_job(
    session: Session,
    ctx: RequestContext,
    *,
    org_id: str | None,
    kind: str,
    params: dict[str, Any] | None = None,
    publish: bool = True,
    parent_id: str | None = None,
) -> Job:
    """Record a queued job and schedule its publication for after the commit.

    ``publish=False`` records a job this process runs itself (the CLI's backfill): no message.
    ``parent_id``: the split job this one is a part of (app/tasks/split.py).

    ``kind`` is the Celery task name (``<domain>.<verb_noun>``), so a job can always be
    re-published from its row alone.
    """
    now = utcnow()
    row: dict[str, Any] = {
        **_NEW_JOB,
        "id": new_id(),
        "org_id": org_id,
        "kind": kind,
        "parent_id": parent_id,
        "params": params or {},
        "created_by": ctx.actor.id,
        "created_at": now,
        "updated_at": now,
    }
    # Every job creation pays for this: one prebuilt INSERT instead of the ORM's flush of a new
    # object (its unit-of-work pass cost more CPU than the round trip; bench/throughput.py). The
    # row is then attached as the persistent object it is, every column known, so reading it
    # costs no query and a later change to it is flushed as an UPDATE like any other.
    session.flush()  # the caller's pending rows first: the job may refer to them
    session.execute(_INSERT_JOB, row)
    job = Job(**row)
    make_transient_to_detached(job)
    session.add(job)
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
        # The same for every message (each job creation publishes one): built once.
        self._options: dict[str, Any] = {
            # The jobs table is the result: never touch the result backend (the cache Redis
            # may be down while the broker is up).
            "ignore_result": True,
            "retry": True,
            "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
            # RabbitMQ: wait (boundedly) for the broker's confirm, so a refused or blocked publish
            # fails this request with broker_unavailable instead of losing the message or hanging.
            **broker.publish_options(celery.conf.broker_url),
        }

    def send(self, job_id: str, task: str) -> None:
        self.celery.send_task(task, args=[job_id], task_id=job_id, **self._options)

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
#
# Every job pays for a claim and an outcome, so these are Core statements on the ``jobs``
# table built once, with bound parameters: building an expression per call and the ORM's
# bulk-update path cost more CPU than the round trip itself (bench/throughput.py). A job row
# the session has loaded is expired instead, so it reads the new state on next access.
# Parameter names carry a ``b_`` prefix: a key named like a column would become a SET clause.
#
# Each of them is also safe to run twice (``Database.autocommit`` repeats one whose connection
# was found dead): a repeated claim finds the job held (None: the lease lapses, the sweep
# re-queues it), a repeated outcome or release finds it no longer held (False), a repeated
# renewal renews.

_J = JOBS.c
_NOW = bindparam("b_now", type_=UTCDateTime())
_ID = bindparam("b_job_id", type_=String())
_HOLDER = bindparam("b_holder", type_=String())


# The job is running and held by the worker named ``b_holder``.
_HELD = and_(_J.id == _ID, _J.status == JobStatus.RUNNING, _J.leased_by == _HOLDER)


def takeable(now: Any) -> Any:
    """The jobs a claim may take: ``queued``, or ``running`` with a lease lapsed before ``now``."""
    return or_(_J.status == JobStatus.QUEUED, and_(_J.status == JobStatus.RUNNING, _J.lease_expires_at < now))


def _claim_stmt(capped: bool) -> Any:
    stmt = update(JOBS).where(_J.id == _ID, takeable(_NOW))
    if capped:
        stmt = stmt.where(_J.attempts < bindparam("b_max_attempts", type_=Integer()))
    return stmt.values(
        status=JobStatus.RUNNING,
        attempts=_J.attempts + 1,
        leased_by=_HOLDER,
        lease_expires_at=bindparam("b_expires", type_=UTCDateTime()),
        started_at=func.coalesce(_J.started_at, _NOW),
        updated_at=_NOW,
    ).returning(*JOBS.c)


_CLAIM = {capped: _claim_stmt(capped) for capped in (False, True)}
_RENEW = update(JOBS).where(_HELD).values(lease_expires_at=bindparam("b_expires", type_=UTCDateTime()), updated_at=_NOW)
_RELEASE = (
    update(JOBS).where(_HELD).values(status=JobStatus.QUEUED, leased_by=None, lease_expires_at=None, updated_at=_NOW)
)
_HOLD = select(_J.id).where(_HELD).with_for_update()
# Only an unfinished job can finish: a late worker cannot overwrite a job the web tier has
# already failed (for instance a reveal that timed out), and a failure cannot undo a success.
# A worker passes its lease: then only the current holder of the running job can finish it,
# so a worker whose lease was taken over (it stalled past the lease) cannot finish it too.
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _finish_stmt(status: JobStatus, leased: bool) -> Any:
    where = _HELD if leased else and_(_J.id == _ID, _J.status.in_(_UNFINISHED))
    outcome: dict[str, Any]
    if status == JobStatus.SUCCEEDED:
        outcome = {"result": bindparam("b_result", type_=JOBS.c.result.type), "error_code": None, "error_message": None}
    else:
        outcome = {
            "error_code": bindparam("b_code", type_=String()),
            "error_message": bindparam("b_message", type_=String()),
        }
    return (
        update(JOBS)
        .where(where)
        .values(status=status, finished_at=_NOW, updated_at=_NOW, lease_expires_at=None, **outcome)
    )


_FINISH = {
    (status, leased): _finish_stmt(status, leased)
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED)
    for leased in (False, True)
}


def _transition(session: Session, job_id: str, stmt: Any, params: dict[str, Any]) -> Any:
    result = session.execute(stmt, {"b_job_id": job_id, "b_now": utcnow(), **params})
    loaded = session.identity_map.get(identity_key(Job, job_id))
    if loaded is not None:
        session.expire(loaded)
    return result


def _changed(session: Session, job_id: str, stmt: Any, params: dict[str, Any]) -> bool:
    return bool(getattr(_transition(session, job_id, stmt, params), "rowcount", 0))


def claim(
    session: Session,
    job_id: str,
    worker_id: str = "local",
    lease_seconds: float | None = None,
    *,
    max_attempts: int | None = None,
) -> Row[Any] | None:
    """Take a job: ``queued``, or ``running`` with an expired lease, and under the attempts cap.

    One conditional UPDATE: the job becomes ``running``, held by ``worker_id`` until
    ``lease_seconds`` from now (``None``: no expiry, for a job run in-process such as the CLI's
    backfill, which no sweep may take away), with ``attempts + 1``. Returns the claimed row
    (every column of ``jobs``, by name); None when nothing matched: the job is finished,
    running under a live lease elsewhere, or out of attempts.
    """
    expires = None if lease_seconds is None else utcnow() + timedelta(seconds=lease_seconds)
    params: dict[str, Any] = {"b_holder": worker_id, "b_expires": expires}
    if max_attempts is not None:
        params["b_max_attempts"] = max_attempts
    row: Row[Any] | None = _transition(session, job_id, _CLAIM[max_attempts is not None], params).one_or_none()
    return row


def renew_lease(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease while ``worker_id`` still holds the running job; False once it does not."""
    expires = utcnow() + timedelta(seconds=lease_seconds)
    return _changed(session, job_id, _RENEW, {"b_holder": worker_id, "b_expires": expires})


def hold(session: Session, job_id: str, worker_id: str) -> bool:
    """Lock the job row while ``worker_id`` still holds it, for the rest of the transaction.

    A task takes this at the start of the transaction that records its outcome (the run row,
    the server's status): while it is held, no sweep can re-queue the job and no other
    worker can claim it, so a worker that lost its lease cannot overwrite what the new
    holder writes. False when the job is no longer ours.
    """
    return session.execute(_HOLD, {"b_job_id": job_id, "b_holder": worker_id}).first() is not None


def release(session: Session, job_id: str, worker_id: str) -> bool:
    """Give a held job back to ``queued`` (a retry is coming); False when it was not held."""
    return _changed(session, job_id, _RELEASE, {"b_holder": worker_id})


def touch(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))


def set_progress(session: Session, job_id: str, done: int, total: int | None) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(progress_done=done, progress_total=total, updated_at=utcnow())
    )


def _finish(session: Session, job_id: str, status: JobStatus, lease: str | None, params: dict[str, Any]) -> bool:
    if lease is not None:
        params["b_holder"] = lease
    return _changed(session, job_id, _FINISH[status, lease is not None], params)


def mark_succeeded(session: Session, job_id: str, result: dict[str, Any] | None, *, lease: str | None = None) -> bool:
    """Finish a job as succeeded; False when it was already finished (or, given ``lease``, not held)."""
    return _finish(session, job_id, JobStatus.SUCCEEDED, lease, {"b_result": result})


def mark_failed(session: Session, job_id: str, code: str, message: str, *, lease: str | None = None) -> bool:
    """Finish a job as failed with a stable code; False as for ``mark_succeeded``."""
    return _finish(session, job_id, JobStatus.FAILED, lease, {"b_code": code, "b_message": message[:1000]})


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
