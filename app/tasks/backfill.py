"""The backfill and verify jobs on the worker side (see app/backfill/)."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from sqlalchemy.orm import Session

from app.audit import service as audit
from app.backfill import service as backfill
from app.backfill import verify
from app.context import Actor, RequestContext
from app.db import new_id
from app.errors import NotFoundError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import Org
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, batch_size_param, job_task, worker_keyring

WORKER = RequestContext(Actor("worker"))
log = logging.getLogger("latchkey.backfill")


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


def check_cache_invalidation(ctx: WorkerContext, org_id: str) -> dict[str, Any]:
    """Resolve, edit, resolve again on this deployment's database, Redis and workers.

    A temporary probe secret (deleted afterwards) is resolved by this worker (L1 and L2
    filled) and by a second resolver with an empty L1 (served by L2); then edited through
    the secrets service with the web tier's invalidation flow. This worker's L1 and a fresh
    resolver (L2) must both answer the new version and value. Never returns a value.
    """
    from redis import Redis

    from app.secrets import invalidation
    from app.secrets import service as secrets_service
    from app.secrets.resolver import build_resolver

    keys = worker_keyring(ctx).public_set()
    client = Redis.from_url(ctx.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    invalidator = invalidation.Invalidator(
        client, ctx.db, ttl=ctx.settings.secret_cache_ttl_seconds, namespace=ctx.settings.queue
    )
    old, new = verify.probe_values()
    steps: dict[str, Any] = {}
    secret_id: str | None = None

    def commit(s: Session) -> None:
        s.commit()
        pending = invalidation.take_pending(s)
        if pending:
            invalidator.flush(pending)

    def seen(resolved: Any, value: str, version: int) -> bool:
        return resolved.version == version and hmac.compare_digest(resolved.value.encode(), value.encode())

    try:
        with ctx.db.session() as s:
            org = s.get(Org, org_id)
            assert org is not None
            probe = secrets_service.create_secret(
                s,
                WORKER,
                org,
                keys,
                name=f"latchkey_verify_probe_{new_id()[-12:]}",
                value=old,
                description="temporary: the backfill verification's cache check (deleted when it ends)",
            )
            secret_id = probe.id
            commit(s)
        first = ctx.resolver.resolve(org_id, secret_id)
        ctx.resolver.flush_fills()
        steps["first_resolve"] = seen(first, old, 1)
        other = build_resolver(ctx.settings, ctx.db, listen=False)
        try:
            steps["shared_cache_before_edit"] = seen(other.resolve(org_id, secret_id), old, 1)
        finally:
            other.close()
        with ctx.db.session() as s:
            org = s.get(Org, org_id)
            assert org is not None
            secrets_service.update_secret(s, WORKER, org, keys, secret_id, {"value": new})
            commit(s)
        steps["after_edit_this_worker"] = seen(ctx.resolver.resolve(org_id, secret_id), new, 2)
        fresh = build_resolver(ctx.settings, ctx.db, listen=False)
        try:
            steps["after_edit_shared_cache"] = seen(fresh.resolve(org_id, secret_id), new, 2)
        finally:
            fresh.close()
        return {"ok": all(steps.values()), "org_id": org_id, "steps": steps}
    except Exception as exc:  # reported in the record, which then fails
        log.warning("backfill verify: the cache check failed: %s", type(exc).__name__)
        return {"ok": False, "org_id": org_id, "steps": steps, "error": type(exc).__name__}
    finally:
        if secret_id is not None:
            try:
                with ctx.db.session() as s:
                    org = s.get(Org, org_id)
                    if org is not None:
                        secrets_service.delete_secret(s, WORKER, org, secret_id)
                        commit(s)
            except Exception as exc:
                log.warning("backfill verify: could not delete the probe secret %s: %s", secret_id, type(exc).__name__)
        client.close()


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
        cache_check=lambda org_id: check_cache_invalidation(ctx, org_id),
        batch_size=batch_size,
        progress=progress,
        job_id=job.id,
    )
    return verify.as_dict(record)
