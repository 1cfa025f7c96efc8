"""Sealing-key tasks on the worker side: the re-seal job of a key rotation."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import Job
from app.secrets import rotation
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, batch_size_param, job_task, worker_keyring

WORKER = RequestContext(Actor("worker"))


@job_task(TaskName.RESEAL_SECRETS, time_limit=3000, max_retries=3)
def reseal_secrets(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Re-seal every sealed value still on an old key to the newest key (batched, resumable).

    The keyring is read from its file here, not taken from the process: a worker started
    before ``latchkey keys rotate`` must see the new key. Each batch commits on its own and
    reports progress; a redelivered job carries on from the rows still on old keys.
    """
    batch_size = batch_size_param(job, rotation.DEFAULT_BATCH_SIZE, rotation.MAX_BATCH_SIZE)
    keyring = worker_keyring(ctx)

    # A redelivered job keeps the progress its earlier attempt committed.
    with ctx.db.session() as s:
        before = int(s.scalar(select(Job.progress_done).where(Job.id == job.id)) or 0) if job.attempts > 1 else 0

    def progress(done: int, total: int) -> None:
        with ctx.db.session() as s:
            jobs.set_progress(s, job.id, before + done, before + total)

    report = rotation.reseal_all(ctx.db, keyring, batch_size=batch_size, progress=progress)
    result = {"key_id": keyring.current_kid, "batch_size": batch_size, **report.as_dict()}
    with ctx.db.session() as s:
        audit.record(s, WORKER, "keys.reseal", org_id=None, target_type="job", target_id=job.id, details=result)
    if report.failed:
        raise JobFailedError(
            "reseal_incomplete",
            f"{report.failed} sealed value(s) did not open with this keyring; see the worker log for their ids",
        )
    return result
