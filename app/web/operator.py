"""Operator page: instance jobs (backfill, verification, re-seal) and the buttons that start them.

Launching creates the same job the operator API creates (``POST /api/v1/admin/backfill``,
``/admin/backfill/verify``, ``/admin/keys/reseal``): ``jobs.create_job`` with the task name as
kind and the same params. The page also shows where the migration stands (rows left, the
latest verification), from the same ``backfill.status`` the CLI and the API use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import abort, flash, redirect, render_template, url_for

from app.api.request import request_context
from app.backfill.status import status as migration_status
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import JobStatus
from app.web.pages import db, page

# The job kinds this page lists, newest first.
LISTED_KINDS = [TaskName.BACKFILL, TaskName.VERIFY, TaskName.RESEAL_SECRETS]
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class Operation:
    """One button on the operator page: which job it starts, with which params."""

    label: str
    kind: str
    help: str
    params: dict[str, Any] = field(default_factory=dict)
    danger: bool = False


# Everything an operator can launch from the UI, by the name used in its URL.
LAUNCHABLE: dict[str, Operation] = {
    "backfill_dry_run": Operation(
        "Backfill: dry run",
        TaskName.BACKFILL,
        "Counts what the backfill would seal and link, and changes nothing.",
        {"dry_run": True},
    ),
    "backfill_run": Operation(
        "Backfill: run",
        TaskName.BACKFILL,
        "Seals legacy plaintext values and links MCP servers and agents to the new secrets and providers.",
        {"dry_run": False},
        danger=True,
    ),
    "backfill_verify": Operation(
        "Verify the backfill",
        TaskName.VERIFY,
        "In a worker: every backfilled value against its legacy value, and a live cache check."
        " The contract migration runs only after a verification passed.",
    ),
    "reseal": Operation(
        "Re-seal all secrets",
        TaskName.RESEAL_SECRETS,
        "Re-seals every sealed value under the workers' newest key (after a key rotation).",
    ),
}


def _jobs() -> list[Any]:
    return jobs.list_jobs(db(), None, LISTED_KINDS, limit=50)


@page("/operator", operator=True)
def operator_home() -> str:
    """Instance jobs and the operations that start them (instance operators only)."""
    listed = _jobs()
    return render_template(
        "operator/index.html",
        jobs=listed,
        operations=LAUNCHABLE,
        unfinished=UNFINISHED,
        kinds=LISTED_KINDS,
        migration=migration_status(db()),
    )


@page("/operator/jobs", operator=True)
def operator_jobs() -> str:
    """The jobs table (a fragment the page polls while a job is unfinished)."""
    return render_template("operator/_jobs.html", jobs=_jobs(), unfinished=UNFINISHED)


@page("/operator/launch/<operation>", ["POST"], operator=True)
def launch(operation: str) -> Any:
    """Start one of :data:`LAUNCHABLE` as an instance job."""
    op = LAUNCHABLE.get(operation)
    if op is None:
        abort(404)
    job = jobs.create_job(db(), request_context(), org_id=None, kind=op.kind, params=dict(op.params))
    flash(f"{op.label}: job {job.id} queued.", "success")
    return redirect(url_for("web.operator_home"))
