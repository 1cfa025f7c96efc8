"""The worker's ``backfill.run`` and ``backfill.verify`` tasks, registered by app/worker.py."""

from __future__ import annotations

from typing import Any

from app.audit import service as audit
from app.backfill import service as backfill
from app.backfill import verify
from app.context import Actor, RequestContext
from app.errors import NotFoundError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.secrets import cache_probe
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, batch_size_param, job_task, worker_keyring

WORKER = RequestContext(Actor("worker"))


@job_task(TaskName.BACKFILL, time_limit=3000, max_retries=3)
def run_backfill(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Run the backfill (batched, resumable, idempotent); the summary is the job's result.

    Seals with the public half of the worker's keyring, read from its file (a key rotated
    since the worker started is used). A redelivered job simply carries on: rows already
    migrated are skipped.
    """
    params = job.params
    batch_size = batch_size_param(job, backfill.DEFAULT_BATCH_SIZE, backfill.MAX_BATCH_SIZE)
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise JobFailedError("invalid_params", "dry_run must be a boolean")
    org = params.get("org")
    if org is not None and not isinstance(org, str):
        raise JobFailedError("invalid_params", "org must be an org slug")
    keys = worker_keyring(ctx).public_set()

    def progress(done: int, total: int) -> None:
        with ctx.db.session() as s:
            jobs.set_progress(s, job.id, done, total)

    try:
        summary = backfill.run_backfill(
            ctx.db, keys, WORKER, dry_run=dry_run, batch_size=batch_size, org_slug=org, progress=progress
        )
    except NotFoundError as exc:
        raise JobFailedError("not_found", exc.detail) from None
    result = summary.as_dict()
    if not dry_run:
        with ctx.db.session() as s:
            counts = {
                k: {"migrated": v["migrated"], "failed": v["failed"]}
                for k, v in result.items()
                if k in ("secrets", "mcp_servers", "agents")
            }
            audit.record(
                s,
                WORKER,
                "backfill.run",
                org_id=None,
                target_type="job",
                target_id=job.id,
                details={"batch_size": batch_size, "org": org, **counts},
            )
    return result


@job_task(TaskName.VERIFY, time_limit=3000, max_retries=3)
def run_verify(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Verify the backfill (see app/backfill/verify.py); the verification record is the result."""
    batch_size = batch_size_param(job, verify.DEFAULT_BATCH_SIZE, backfill.MAX_BATCH_SIZE)
    keyring = worker_keyring(ctx)

    def progress(done: int, total: int) -> None:
        with ctx.db.session() as s:
            jobs.set_progress(s, job.id, done, total)

    record = verify.run_verify(
        ctx.db,
        keyring,
        WORKER,
        cache_check=lambda org_id: cache_probe.check_cache_invalidation(
            ctx.settings, ctx.db, ctx.resolver, keyring.public_set(), org_id
        ),
        batch_size=batch_size,
        progress=progress,
        job_id=job.id,
    )
    return verify.as_dict(record)
