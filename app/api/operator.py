"""Operator endpoints (``/api/v1/admin/...``): instance jobs - key re-seal, worker ping, any instance job by id.

Instance operators only (``auth="operator"``); the jobs they start belong to no org. The
backfill's endpoints (``/admin/backfill``) are the legacy package's (``app/backfill/api.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask.blueprints import BlueprintSetupState
from pydantic import Field
from werkzeug.routing import BaseConverter

from app.api.blueprint import bp
from app.api.jobs import accepted
from app.api.request import request_context, session
from app.api.routing import Result, route
from app.api.schemas import JobAccepted
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.jobs.schemas import JobOut
from app.schemas import Strict


class InstanceJobId(BaseConverter):
    """An instance job id: any segment but ``ping``, which is ``POST /admin/jobs/ping``.

    Without it ``/admin/jobs/ping`` also matches the GET rule, so its 405 would advertise a GET.
    """

    regex = r"(?!ping$)[^/]+"


@bp.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault("instance_job_id", InstanceJobId)


@route(
    bp,
    "/admin/jobs/<instance_job_id:job_id>",
    "GET",
    response=JobOut,
    auth="operator",
    tags=["admin"],
    errors=[401, 403, 404],
)
def get_admin_job(job_id: str) -> JobOut:
    """An instance job (backfill, verification, re-seal, ping) for operators."""
    return JobOut.model_validate(jobs.get_job(session(), None, job_id))


@route(
    bp,
    "/admin/jobs/ping",
    "POST",
    response=JobAccepted,
    status=202,
    auth="operator",
    tags=["admin"],
    errors=[401, 403, 503],
)
def ping_workers() -> Result:
    """Queue a no-op job: proves a worker is taking jobs, end to end."""
    return accepted(jobs.create_job(session(), request_context(), org_id=None, kind=TaskName.PING))


def instance_job(kind: str, body: Strict | None) -> Result:
    """Queue an instance job whose params are the optional JSON body's fields that were given."""
    params = {k: v for k, v in body.model_dump().items() if v is not None} if body is not None else {}
    return accepted(jobs.create_job(session(), request_context(), org_id=None, kind=kind, params=params))


def instance_job_route(rule: str, body: type[Strict]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare ``POST rule``: an operator queues an instance job; the JSON body is optional (202)."""
    return route(
        bp,
        rule,
        "POST",
        body=body,
        body_required=False,
        response=JobAccepted,
        status=202,
        auth="operator",
        tags=["admin"],
        errors=[401, 403, 415, 422, 503],
    )


class BatchRequest(Strict):
    """Optional body of the batched operator jobs (``/admin/keys/reseal``, ``/admin/backfill/verify``)."""

    batch_size: int | None = Field(default=None, ge=1, le=5000)
    part_rows: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="rows per part; the parts run on every worker process at once (default 5000)",
    )


@instance_job_route("/admin/keys/reseal", BatchRequest)
def reseal_keys(body: BatchRequest | None) -> Result:
    """Queue a re-seal of every sealed value to the workers' newest key (after a rotation).

    The body is optional: ``{"batch_size": N, "part_rows": M}`` (1..5000, default 500; parts
    of 5000 rows, taken by every worker process).
    """
    return instance_job(TaskName.RESEAL_SECRETS, body)
