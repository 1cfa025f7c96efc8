"""The backfill job on the worker side: legacy rows into sealed secrets and providers."""

from __future__ import annotations

from typing import Any

from app.audit import service as audit
from app.backfill import service as backfill
from app.context import Actor, RequestContext
from app.errors import NotFoundError
from app.jobs import service as jobs
from app.secrets.keyring import Keyring, KeyringError
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, job_task

BACKFILL_TASK = backfill.BACKFILL_TASK
WORKER = RequestContext(Actor("worker"))


@job_task(BACKFILL_TASK, time_limit=3000, max_retries=3)
def run_backfill(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Run the backfill (batched, resumable, idempotent); the summary is the job's result.

    Seals with the public half of the worker's keyring, read from its file (a key rotated
    since the worker started is used). A redelivered job simply carries on: rows already
    migrated are skipped.
    """
    params = job.params
    batch_size = params.get("batch_size", backfill.DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise JobFailedError("invalid_params", "batch_size must be an integer")
    if not 1 <= batch_size <= backfill.MAX_BATCH_SIZE:
        raise JobFailedError("invalid_params", f"batch_size must be in 1..{backfill.MAX_BATCH_SIZE}")
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise JobFailedError("invalid_params", "dry_run must be a boolean")
    org = params.get("org")
    if org is not None and not isinstance(org, str):
        raise JobFailedError("invalid_params", "org must be an org slug")
    if ctx.settings.private_keys_file is None:
        raise JobFailedError("keyring_unavailable", "this worker has no keyring (LATCHKEY_PRIVATE_KEYS_FILE)")
    try:
        keys = Keyring.load(ctx.settings.private_keys_file).public_set()
    except KeyringError as exc:
        raise JobFailedError("keyring_unavailable", str(exc)) from None

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
