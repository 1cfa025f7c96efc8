"""Jobs end to end: API enqueue -> real broker -> real worker -> jobs table."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from app.db import utcnow
from app.factory import create_app
from app.jobs import service as jobs
from app.models import AuditEvent, Job
from app.tasks.runtime import JobView, TransientError, WorkerContext, job_task
from tests.support import backends
from tests.support.factories import CTX, Factory, drop_queued
from tests.support.workers import wait_for, wait_job


def test_ping_job_runs_on_a_real_worker(worker: Celery, factory: Factory) -> None:
    operator = factory.user(operator=True)
    resp = operator.post("admin/jobs/ping")
    assert resp.status_code == 202
    job = resp.get_json()["job"]
    assert job["status"] == "queued" and job["kind"] == "system.ping"
    done = wait_job(operator.get, f"admin/jobs/{job['id']}")
    assert done["status"] == "succeeded"
    assert done["result"]["pong"] is True
    assert done["started_at"] and done["finished_at"]


def test_a_redelivered_job_changes_nothing(worker: Celery, factory: Factory, db: Any) -> None:
    operator = factory.user(operator=True)
    job_id = operator.post("admin/jobs/ping").get_json()["job"]["id"]
    first = wait_job(operator.get, f"admin/jobs/{job_id}")
    with db.session() as s:
        attempts = s.get(Job, job_id).attempts  # type: ignore[union-attr]
    # The same message again (a broker redelivery after a lost ack).
    outcome = worker.send_task("system.ping", args=[job_id]).get(timeout=20)
    assert outcome == "skipped"
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and row.attempts == attempts and row.status == "succeeded"
    assert operator.get(f"admin/jobs/{job_id}").get_json() == first


def test_task_messages_carry_only_the_job_id(worker: Celery, factory: Factory) -> None:
    operator = factory.user(operator=True)
    job_id = operator.post("admin/jobs/ping").get_json()["job"]["id"]
    wait_job(operator.get, f"admin/jobs/{job_id}")
    # What a producer sends is decided by the publisher: args == [job_id], nothing else.
    seen: list[Any] = []
    original = worker.send_task

    def spy(name: str, args: Any = None, **kw: Any) -> Any:
        seen.append((name, args, {k: v for k, v in kw.items() if k in ("kwargs",)}))
        return original(name, args=args, **kw)

    worker.send_task = spy  # type: ignore[method-assign]
    try:
        jobs.Publisher(worker, factory.db).send(job_id, "system.ping")
    finally:
        del worker.send_task
    assert seen == [("system.ping", [job_id], {})]


def test_broker_outage_answers_503_and_marks_the_job_failed(settings: Any, factory: Factory, db: Any) -> None:
    broken = create_app(settings.model_copy(update={"broker_url": backends.closed_broker_url()}))
    try:
        operator = factory.user(operator=True)
        resp = broken.test_client().post("/api/v1/admin/jobs/ping", headers=operator.headers())
        assert resp.status_code == 503
        assert resp.get_json()["code"] == "broker_unavailable"
        with db.session() as s:
            job = s.scalars(select(Job)).one()
            assert (job.status, job.error_code) == ("failed", "broker_unavailable")
    finally:
        broken.extensions["latchkey.db"].dispose()


def test_beat_requeues_jobs_whose_message_was_lost(worker: Celery, factory: Factory, db: Any) -> None:
    with db.session() as s:
        job = jobs.create_job(s, CTX, org_id=None, kind="system.ping")
        drop_queued(s)  # the message is "lost": never published
        job_id = job.id
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow() - timedelta(minutes=10)))
    assert worker.send_task("jobs.requeue_stuck").get(timeout=20) >= 1

    def succeeded() -> bool:
        with db.session() as s:
            return s.get(Job, job_id).status == "succeeded"  # type: ignore[union-attr]

    wait_for(succeeded)


def test_job_creation_is_audited(worker: Celery, factory: Factory, db: Any) -> None:
    operator = factory.user(operator=True)
    job_id = operator.post("admin/jobs/ping").get_json()["job"]["id"]
    with db.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.target_id == job_id)).all()
        assert [e.action for e in events] == ["job.create"]


def test_a_finished_job_cannot_be_finished_again(factory: Factory, db: Any) -> None:
    with db.session() as s:
        job_id = jobs.create_job(s, CTX, org_id=None, kind="system.ping").id
        drop_queued(s)
    with db.session() as s:
        jobs.mark_failed(s, job_id, "worker_unavailable", "no worker answered in time")
    with db.session() as s:
        jobs.mark_succeeded(s, job_id, {"late": True})  # a worker answering after the timeout
        jobs.mark_failed(s, job_id, "internal_error", "x")
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.error_code, row.result) == ("failed", "worker_unavailable", None)


FLAKY_CALLS: list[int] = []


@job_task("tests.flaky_job", max_retries=3)
def flaky_job(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Fails twice the way a database outage does, then works."""
    FLAKY_CALLS.append(job.attempts)
    if len(FLAKY_CALLS) < 3:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    return {"ok": True}


@job_task("tests.always_down", max_retries=2)
def always_down(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    raise TransientError("upstream_unavailable", "still down")


def _eager(settings: Any, name: str, db: Any) -> tuple[str, Any]:
    from app.worker import make_celery

    app = make_celery(settings)
    with db.session() as s:
        job_id = jobs.create_job(s, CTX, org_id=None, kind=name).id
        drop_queued(s)
    outcome = app.tasks[name].apply(args=[job_id]).get(disable_sync_subtasks=False)
    return job_id, outcome


def test_transient_errors_are_retried_until_the_job_succeeds(settings: Any, db: Any) -> None:
    FLAKY_CALLS.clear()
    job_id, _ = _eager(settings, "tests.flaky_job", db)
    assert FLAKY_CALLS == [1, 2, 3]  # claimed again on every retry
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.result, row.attempts) == ("succeeded", {"ok": True}, 3)


def test_a_transient_error_that_outlasts_the_retries_fails_with_its_code(settings: Any, db: Any) -> None:
    job_id, _ = _eager(settings, "tests.always_down", db)
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.error_code) == ("failed", "upstream_unavailable")
        assert row.attempts == 3  # the first run and two retries


def test_retries_stop_at_the_attempts_cap_and_the_job_fails_instead_of_waiting_queued(settings: Any, db: Any) -> None:
    # always_down would retry twice (3 attempts); a cap of 2 attempts ends it after the first retry.
    job_id, _ = _eager(settings.model_copy(update={"job_max_attempts": 2}), "tests.always_down", db)
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.status, row.error_code, row.attempts) == ("failed", "upstream_unavailable", 2)
        assert row.lease_expires_at is None
