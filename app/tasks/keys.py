"""Sealing-key tasks on the worker side: the re-seal job of a key rotation."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.jobs import service as jobs
from app.models import Job
from app.secrets import rotation
from app.secrets.keyring import Keyring, KeyringError
from app.tasks.runtime import JobFailedError, JobView, WorkerContext, job_task

RESEAL_TASK = rotation.RESEAL_TASK
WORKER = RequestContext(Actor("worker"))


@job_task(RESEAL_TASK, time_limit=3000, max_retries=3)
def reseal_secrets(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Re-seal every sealed value still on an old key to the newest key (batched, resumable).

    The keyring is read from its file here, not taken from the process: a worker started
    before ``latchkey keys rotate`` must see the new key. Each batch commits on its own and
    reports progress; a redelivered job carries on from the rows still on old keys.
    """
    batch_size = job.params.get("batch_size", rotation.DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise JobFailedError("invalid_params", "batch_size must be an integer")
    if not 1 <= batch_size <= rotation.MAX_BATCH_SIZE:
        raise JobFailedError("invalid_params", f"batch_size must be in 1..{rotation.MAX_BATCH_SIZE}")
    if ctx.settings.private_keys_file is None:
        raise JobFailedError("keyring_unavailable", "this worker has no keyring (LATCHKEY_PRIVATE_KEYS_FILE)")
    try:
        keyring = Keyring.load(ctx.settings.private_keys_file)
    except KeyringError as exc:
        raise JobFailedError("keyring_unavailable", str(exc)) from None

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
