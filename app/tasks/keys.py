"""Sealing-key tasks on the worker side: the re-seal job of a key rotation, split into parts."""

from __future__ import annotations

from typing import Any

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.jobs import parts
from app.jobs.names import TaskName
from app.secrets import rotation
from app.tasks.runtime import (
    JobFailedError,
    JobView,
    TransientError,
    WorkerContext,
    batch_size_param,
    worker_keyring,
)
from app.tasks.split import Checkpoint, part_rows_param, split_job

WORKER = RequestContext(Actor("worker"))


@split_job(TaskName.RESEAL_SECRETS)
class ResealSecrets:
    """Re-seal every sealed value still on an old key to the newest key, in parts every worker takes.

    The keyring is read from its file here, not taken from the process: a worker started
    before ``latchkey keys rotate`` must see the new key. A part is a range of ids
    (``rotation.plan``); each batch commits on its own with the part's totals, and a part
    taken again carries on after the last id its earlier attempt committed.
    """

    def plan(self, ctx: WorkerContext, job: JobView) -> list[tuple[dict[str, Any], int]]:
        batch_size = batch_size_param(job, rotation.DEFAULT_BATCH_SIZE, rotation.MAX_BATCH_SIZE)
        keyring = worker_keyring(ctx)
        return [
            ({**spec, "batch_size": batch_size, "key_id": keyring.current_kid}, rows)
            for spec, rows in rotation.plan(ctx.db, keyring.current_kid, part_rows_param(job))
        ]

    def work(self, ctx: WorkerContext, part: JobView, checkpoint: Checkpoint) -> dict[str, Any]:
        batch_size = batch_size_param(part, rotation.DEFAULT_BATCH_SIZE, rotation.MAX_BATCH_SIZE)
        keyring = worker_keyring(ctx)
        if keyring.current_kid != part.params.get("key_id"):
            # This worker's ring is not the one the job was planned with (a rolling restart after
            # `latchkey keys rotate`): re-sealing to another key would only need redoing.
            raise TransientError(
                "keyring_mismatch", "this worker's newest key is not the one the re-seal was planned for"
            )
        with ctx.db.session() as s:
            state = parts.saved_state(s, part.id)
        report = rotation.reseal_part(
            ctx.db, keyring, part.params, batch_size=batch_size, state=state, checkpoint=checkpoint
        )
        return report.as_dict()

    def merge(self, ctx: WorkerContext, job: JobView, results: list[dict[str, Any]]) -> dict[str, Any]:
        batch_size = batch_size_param(job, rotation.DEFAULT_BATCH_SIZE, rotation.MAX_BATCH_SIZE)
        report = rotation.ResealReport()
        for state in results:
            report.merge(rotation.ResealReport.restore(state))
        result = {"key_id": worker_keyring(ctx).current_kid, "batch_size": batch_size, **report.as_dict()}
        with ctx.db.session() as s:
            audit.record(s, WORKER, "keys.reseal", org_id=None, target_type="job", target_id=job.id, details=result)
        if report.failed:
            raise JobFailedError(
                "reseal_incomplete",
                f"{report.failed} sealed value(s) did not open with this keyring; see the worker log for their ids",
            )
        return result
