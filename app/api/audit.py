"""Audit events (org admin)."""

from __future__ import annotations

from app.access import OrgAccess
from app.api.blueprint import bp
from app.api.request import session
from app.api.routing import route
from app.api.schemas import AuditQuery
from app.audit import service as audit
from app.audit.schemas import AuditEventList


@route(
    bp,
    "/orgs/<org>/audit-events",
    "GET",
    query=AuditQuery,
    response=AuditEventList,
    tags=["audit"],
    errors=[401, 403, 404, 422],
    org_role="admin",
)
def list_audit_events(access: OrgAccess, query: AuditQuery) -> AuditEventList:
    """List the org's audit events, newest first (org admin)."""
    page = audit.list_events(session(), access, query, limit=query.limit, cursor=query.cursor)
    return AuditEventList.model_validate(page)
