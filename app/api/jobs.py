"""Jobs: an org's jobs, for its members to follow (instance jobs: app.api.operator)."""

from __future__ import annotations

from app.access import OrgAccess
from app.api.blueprint import bp
from app.api.request import session
from app.api.routing import Result, route
from app.api.schemas import JobAccepted
from app.jobs import service as jobs
from app.jobs.schemas import JobOut
from app.models import Job


def accepted(job: Job) -> Result:
    """The 202 answer of every endpoint that starts work."""
    return Result(JobAccepted(job=JobOut.model_validate(job)), 202, {"Location": f"jobs/{job.id}"})


@route(bp, "/orgs/<org>/jobs/<job_id>", "GET", response=JobOut, tags=["jobs"], errors=[401, 404], org_role="member")
def get_org_job(access: OrgAccess, job_id: str) -> JobOut:
    """A job of the org: status, progress, result (never a secret) and error."""
    return JobOut.model_validate(jobs.get_org_job(session(), access, job_id))
