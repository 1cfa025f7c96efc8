"""Housekeeping tasks: ping (a worker health probe) and re-queueing stuck jobs."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from app.jobs import service as jobs
from app.tasks.runtime import JobView, WorkerContext, job_task, worker_context


@job_task("system.ping", time_limit=10)
def ping(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Do nothing but prove a worker picks up jobs (and measure the queue's overhead)."""
    return {"pong": True, "worker": ctx.hostname}


@shared_task(name="jobs.requeue_stuck", bind=True, acks_late=True, time_limit=60)  # type: ignore[untyped-decorator]
def requeue_stuck(self: Task) -> int:
    """Re-publish jobs left in ``queued`` (their message was lost); beat runs this."""
    wc = worker_context(self.app)
    with wc.db.session() as s:
        stuck = [(j.id, j.kind) for j in jobs.stuck_jobs(s)]
        for job_id, _kind in stuck:
            # Touch updated_at so a job is re-sent once per STUCK_AFTER window, not on every beat.
            jobs.touch(s, job_id)
    publisher = jobs.Publisher(self.app, wc.db)
    for job_id, kind in stuck:
        publisher.send(job_id, kind)
    return len(stuck)
