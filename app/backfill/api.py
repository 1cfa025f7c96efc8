"""The backfill's operator endpoints: ``POST`` and ``GET /admin/backfill``, ``POST /admin/backfill/verify``.

Registered on the API blueprint when ``app.api`` loads the extensions (app/extensions.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from app.api.blueprint import bp
from app.api.operator import BatchRequest, instance_job, instance_job_route
from app.api.request import session
from app.api.routing import Result, route
from app.backfill.status import status as migration_status
from app.jobs.names import TaskName
from app.jobs.schemas import JobOut
from app.schemas import Out


class BackfillRequest(BatchRequest):
    """Optional body of ``POST /admin/backfill``."""

    dry_run: bool | None = None


@instance_job_route("/admin/backfill", BackfillRequest)
def start_backfill(body: BackfillRequest | None) -> Result:
    """Queue the backfill: legacy plaintext secrets, MCP tokens and agent keys into sealed secrets.

    The body is optional: ``{"dry_run": true, "batch_size": N}`` (1..5000, default 200). The
    job's result is the summary (counts per kind, failures with reasons, never a value).
    """
    return instance_job(TaskName.BACKFILL, body)


@instance_job_route("/admin/backfill/verify", BatchRequest)
def start_verify(body: BatchRequest | None) -> Result:
    """Queue the backfill verification (in a worker: every backfilled value against the legacy one).

    The body is optional: ``{"batch_size": N}`` (1..5000, default 1000). The job's result is
    the verification record, also shown by ``GET /admin/backfill``; the contract migration
    runs only after one passes.
    """
    return instance_job(TaskName.VERIFY, body)


class BackfillStatus(Out):
    legacy_columns: bool = Field(description="false once the contract migration has dropped them")
    remaining: dict[str, int] = Field(description="legacy rows not yet migrated, per kind")
    latest_run: JobOut | None
    latest_verification: dict[str, Any] | None = Field(
        description="counts, failures (never a value), unmigrated rows, cache check, times"
    )


@route(bp, "/admin/backfill", "GET", response=BackfillStatus, auth="operator", tags=["admin"], errors=[401, 403])
def backfill_status() -> BackfillStatus:
    """Where the legacy migration stands: rows left, the latest backfill run and verification."""
    return BackfillStatus.model_validate(migration_status(session()))
