"""Split jobs: a backfill, verify or reseal planned as parts (child jobs) that every worker process takes.

A split job plans its work as parts, each an ordinary job row (kind ``jobs.run_part``,
``parent_id`` = the split job) published like any other, so each part has what every job
has: a lease renewed while it runs, attempts, the sweep that gives a dead worker's part to
another worker, beat's re-send of a lost message. Any worker process takes any part.

The split job itself takes parts too, inline, while any is waiting (so one worker process
with one slot still finishes the job); then it waits for the parts other workers hold,
sets its progress from theirs, and merges their results into its own. Redelivered or
re-claimed, it plans nothing twice: the parts it planned are found by ``parent_id``.

A part that writes (backfill, reseal) checkpoints after each batch, in the batch's own
transaction: the part's lease is checked with its row locked (``JobView.ensure_held``) and its
running totals are stored on its row. A part's batch therefore commits only while the part is
held, and its totals count each row exactly once, however often the part is killed and
taken again: a new attempt starts from the totals its predecessors committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.context import Actor, RequestContext
from app.db import utcnow
from app.jobs import parts
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import Job, JobStatus
from app.tasks.runtime import (
    LONGEST_TIME_LIMIT,
    JobFailedError,
    JobView,
    WorkerContext,
    execute,
    job_task,
)

WORKER = RequestContext(Actor("worker"))
# How often a split job looks at the parts other workers hold.
POLL_SECONDS = 0.25
# Rows a part covers by default, and at most (the job's ``part_rows`` param).
DEFAULT_PART_ROWS = 5000
MAX_PART_ROWS = 1_000_000


class Checkpoint:
    """Called at the end of each batch of a part, in the batch's transaction (see the module doc)."""

    def __init__(self, part: JobView) -> None:
        self.part = part

    def __call__(self, session: Session, state: dict[str, Any] | None, done: int, total: int | None) -> None:
        """Store the part's running totals (``state``; None: keep) and progress (``total`` None: as planned)."""
        self.part.ensure_held(session)  # the row stays locked until the batch commits
        values: dict[str, Any] = {"progress_done": done, "updated_at": utcnow()}
        if state is not None:
            values["result"] = state
        if total is not None:
            values["progress_total"] = total
        session.execute(update(Job).where(Job.id == self.part.id).values(values))
        if self.part.parent_id is not None:  # the split job's progress follows its parts' batches
            parent = self.part.parent_id
            rows_done = select(func.coalesce(func.sum(Job.progress_done), 0)).where(Job.parent_id == parent)
            session.execute(update(Job).where(Job.id == parent).values(progress_done=rows_done.scalar_subquery()))


class Split(Protocol):
    """What a split job says about its work; the running is :func:`run_split`'s."""

    def plan(self, ctx: WorkerContext, job: JobView) -> list[tuple[dict[str, Any], int]]:
        """Each part's params (ids and options only, as every job's params) and rows planned."""

    def work(self, ctx: WorkerContext, part: JobView, checkpoint: Checkpoint) -> dict[str, Any]:
        """Do one part; ``part.result`` holds the totals of earlier attempts (None on the first)."""

    def merge(self, ctx: WorkerContext, job: JobView, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The split job's result from every part's."""


SPLITS: dict[str, Split] = {}


def split_job(name: TaskName, *, max_retries: int = 3) -> Callable[[type[Any]], type[Any]]:
    """Declare a split job's task over a :class:`Split` class (its parts run as ``jobs.run_part``)."""

    def decorator(cls: type[Any]) -> type[Any]:
        split: Split = cls()
        SPLITS[name] = split

        def fn(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
            return run_split(ctx, job, split)

        fn.__doc__ = cls.__doc__
        job_task(name, time_limit=LONGEST_TIME_LIMIT, max_retries=max_retries)(fn)
        return cls

    return decorator


def part_rows_param(job: JobView) -> int:
    value = job.params.get("part_rows", DEFAULT_PART_ROWS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PART_ROWS:
        raise JobFailedError("invalid_params", f"part_rows must be an integer in 1..{MAX_PART_ROWS}")
    return value


def run_split(ctx: WorkerContext, job: JobView, split: Split) -> dict[str, Any]:
    """Plan the parts (once), take them while any waits, wait for the rest, merge."""
    with ctx.db.session() as s:
        planned = parts.count(s, job.id)
    if not planned:
        specs = split.plan(ctx, job)
        with ctx.db.session() as s:
            job.ensure_held(s)
            for spec, planned_rows in specs:
                params = {"split": job.kind, **spec}
                part = jobs.create_job(s, WORKER, org_id=None, kind=TaskName.RUN_PART, params=params, parent_id=job.id)
                part.progress_total = planned_rows
            jobs.set_progress(s, job.id, 0, sum(rows for _spec, rows in specs))
        # Published when that transaction committed: every worker may take a part from now on.
    holder = job.lease.holder if job.lease is not None else "local"
    while True:
        job.ensure_held()
        with ctx.db.session() as s:
            part_id = parts.takeable(s, job.id, max_attempts=ctx.settings.job_max_attempts)
        if part_id is not None:
            execute(ctx, part_id, f"{holder}/part"[:200], run_part_fn, retry=_later)
            continue
        with ctx.db.session() as s:
            tally = parts.tally(s, job.id, max_attempts=ctx.settings.job_max_attempts)
            jobs.set_progress(s, job.id, tally.rows_done, tally.rows_total)
        if tally.unfinished == 0:
            break
        time.sleep(POLL_SECONDS)
    with ctx.db.session() as s:
        rows = parts.finished(s, job.id)
    failed = [p for p in rows if p.status != JobStatus.SUCCEEDED]
    if failed:
        codes = sorted({p.error_code or "unknown" for p in failed})
        raise JobFailedError(
            "part_failed",
            f"{len(failed)} of {len(rows)} part(s) failed ({', '.join(codes)}); what the others did is kept: "
            "run the job again to finish",
        )
    result = split.merge(ctx, job, [p.result or {} for p in rows])
    result["parts"] = {"count": len(rows), "workers": len({parts.process_of(p.leased_by) for p in rows})}
    return result


def _later(_exc: Exception) -> None:
    """A part run inline hit a transient error: it is queued again for whoever takes it next
    (after a pause, so a dependency that is down is not hammered by the split job's loop)."""
    time.sleep(1.0)


def run_part_fn(ctx: WorkerContext, part: JobView) -> dict[str, Any]:
    """One part of a split job (backfill, verify, reseal): its split job's ``work`` on it."""
    split = SPLITS.get(str(part.params.get("split")))
    if split is None:
        raise JobFailedError("invalid_params", "this part belongs to no known split job")
    result = split.work(ctx, part, Checkpoint(part))
    with ctx.db.session() as s:  # all its rows are done: the split job's progress counts them
        part.ensure_held(s)
        s.execute(update(Job).where(Job.id == part.id).values(progress_done=func.coalesce(Job.progress_total, 0)))
    return result


job_task(TaskName.RUN_PART, time_limit=LONGEST_TIME_LIMIT, max_retries=3)(run_part_fn)
