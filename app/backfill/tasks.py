"""The worker's ``backfill.run`` and ``backfill.verify``, split jobs (app/tasks/split.py); see app/worker.py."""

from __future__ import annotations

from typing import Any

from app.audit import service as audit
from app.backfill import legacy, verify
from app.backfill import service as backfill
from app.context import Actor, RequestContext
from app.errors import NotFoundError
from app.jobs import parts
from app.jobs.names import TaskName
from app.secrets import cache_probe
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, batch_size_param, worker_keyring
from app.tasks.split import Checkpoint, part_rows_param, split_job

WORKER = RequestContext(Actor("worker"))


def _options(job: JobView) -> dict[str, Any]:
    """The run's options, checked (the same on the job and on each of its parts)."""
    params = job.params
    dry_run = params.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise JobFailedError("invalid_params", "dry_run must be a boolean")
    org = params.get("org")
    if org is not None and not isinstance(org, str):
        raise JobFailedError("invalid_params", "org must be an org slug")
    batch_size = batch_size_param(job, backfill.DEFAULT_BATCH_SIZE, backfill.MAX_BATCH_SIZE)
    return {"dry_run": dry_run, "org": org, "batch_size": batch_size}


@split_job(TaskName.BACKFILL)
class BackfillRun:
    """Run the backfill (batched, resumable, idempotent) as parts every worker takes; the summary is the result.

    A part is a set of whole orgs (``service.plan``). Seals with the public half of the
    worker's keyring, read from its file (a key rotated since the worker started is used). A
    redelivered job or part simply carries on: rows already migrated are skipped, and a part's
    totals are those its batches committed.
    """

    def plan(self, ctx: WorkerContext, job: JobView) -> list[tuple[dict[str, Any], int]]:
        options = _options(job)
        try:
            groups = backfill.plan(ctx.db, org_slug=options["org"], part_rows=part_rows_param(job))
        except NotFoundError as exc:
            raise JobFailedError("not_found", exc.detail) from None
        return [({**options, "orgs": orgs}, rows) for orgs, rows in groups]

    def work(self, ctx: WorkerContext, part: JobView, checkpoint: Checkpoint) -> dict[str, Any]:
        options = _options(part)
        state = None
        if not options["dry_run"]:  # a dry run writes nothing: taken again, it simply starts over
            with ctx.db.session() as s:
                state = parts.saved_state(s, part.id)
        summary = backfill.run_part(
            ctx.db,
            worker_keyring(ctx).public_set(),
            WORKER,
            list(part.params["orgs"]),
            dry_run=options["dry_run"],
            batch_size=options["batch_size"],
            org_slug=options["org"],
            state=state,
            checkpoint=checkpoint,
        )
        return summary.state()

    def merge(self, ctx: WorkerContext, job: JobView, results: list[dict[str, Any]]) -> dict[str, Any]:
        options = _options(job)
        summary = backfill.Summary(dry_run=options["dry_run"], batch_size=options["batch_size"], org=options["org"])
        for state in results:
            summary.merge(backfill.Summary.restore(state))
        result = summary.as_dict()
        if not options["dry_run"]:
            counts = {k: {"migrated": result[k]["migrated"], "failed": result[k]["failed"]} for k in backfill.STEPS}
            with ctx.db.session() as s:
                audit.record(
                    s,
                    WORKER,
                    "backfill.run",
                    org_id=None,
                    target_type="job",
                    target_id=job.id,
                    details={"batch_size": options["batch_size"], "org": options["org"], **counts},
                )
        return result


@split_job(TaskName.VERIFY)
class BackfillVerify:
    """Verify the backfill (see app/backfill/verify.py) in parts; the verification record is the result."""

    def plan(self, ctx: WorkerContext, job: JobView) -> list[tuple[dict[str, Any], int]]:
        batch_size = batch_size_param(job, verify.DEFAULT_BATCH_SIZE, backfill.MAX_BATCH_SIZE)
        groups = backfill.plan(ctx.db, org_slug=None, part_rows=part_rows_param(job), which=legacy.CARRYING)
        return [({"batch_size": batch_size, "orgs": orgs}, rows) for orgs, rows in groups]

    def work(self, ctx: WorkerContext, part: JobView, checkpoint: Checkpoint) -> dict[str, Any]:
        batch_size = batch_size_param(part, verify.DEFAULT_BATCH_SIZE, backfill.MAX_BATCH_SIZE)

        def progress(done: int) -> None:
            with ctx.db.session() as s:
                checkpoint(s, None, done, None)

        # Read-only: a part taken again simply checks its orgs again.
        orgs = list(part.params["orgs"])
        return verify.verify_part(ctx.db, worker_keyring(ctx), orgs, batch_size=batch_size, progress=progress)

    def merge(self, ctx: WorkerContext, job: JobView, results: list[dict[str, Any]]) -> dict[str, Any]:
        keyring = worker_keyring(ctx)
        record = verify.record_verification(
            ctx.db,
            WORKER,
            results,
            cache_check=lambda org_id: cache_probe.check_cache_invalidation(
                ctx.settings, ctx.db, ctx.resolver, keyring.public_set(), org_id
            ),
            job_id=job.id,
        )
        return verify.as_dict(record)
