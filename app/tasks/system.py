"""Housekeeping tasks: ping (a worker health probe), re-queueing stuck jobs, sweeping leases."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Task

from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.tasks.runtime import VISIBILITY_TIMEOUT, JobView, WorkerContext, job_task, periodic_task, worker_context

log = logging.getLogger("latchkey.worker")


@job_task(TaskName.PING, time_limit=10)
def ping(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Do nothing but prove a worker picks up jobs (and measure the queue's overhead)."""
    return {"pong": True, "worker": ctx.hostname}


@periodic_task(TaskName.REQUEUE_STUCK, time_limit=60)
def requeue_stuck(self: Task) -> int:
    """Re-publish jobs left in ``queued`` (their message was lost); beat runs this.

    A duplicate is harmless: ``claim`` takes a job only once (a live lease keeps the second
    message out), so re-sending a job that is merely waiting in a long queue costs a no-op.
    """
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


@periodic_task(TaskName.SWEEP_LEASES, time_limit=60)
def sweep_leases(self: Task) -> dict[str, int]:
    """Recover jobs whose worker died (lease expired): re-queue and re-publish them, or fail
    them with ``worker_lost`` once they used ``LATCHKEY_JOB_MAX_ATTEMPTS``; beat runs this."""
    wc = worker_context(self.app)
    with wc.db.session() as s:
        swept = jobs.sweep_leases(
            s, max_attempts=wc.settings.job_max_attempts, legacy_after=timedelta(seconds=VISIBILITY_TIMEOUT)
        )
    # After the commit: a worker that gets the message finds the row queued.
    publisher = jobs.Publisher(self.app, wc.db)
    for pub in swept.requeued:
        try:
            publisher.send(pub.job_id, pub.task)
        except Exception as exc:  # the job stays queued: requeue_stuck re-sends it later
            log.warning("could not re-publish job %s: %s", pub.job_id, type(exc).__name__)
    return {"requeued": len(swept.requeued), "lost": len(swept.lost)}
