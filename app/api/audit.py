"""Audit events (org admin)."""

from __future__ import annotations

from sqlalchemy import select

from app.api.blueprint import bp
from app.api.framework import current_user, route, session
from app.api.schemas import AuditEventList, AuditEventOut, AuditQuery, Ref
from app.identity.access import org_access as access_of
from app.models import AuditEvent
from app.pagination import paginate


@route(
    bp,
    "/orgs/<org>/audit-events",
    "GET",
    query=AuditQuery,
    response=AuditEventList,
    tags=["audit"],
    errors=[401, 403, 404, 422],
)
def list_audit_events(org: str, query: AuditQuery) -> AuditEventList:
    """List the org's audit events, newest first (org admin)."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    stmt = select(AuditEvent).where(AuditEvent.chain == access.org.id)
    if query.action:
        stmt = stmt.where(AuditEvent.action == query.action)
    if query.target_type:
        stmt = stmt.where(AuditEvent.target_type == query.target_type)
    if query.target_id:
        stmt = stmt.where(AuditEvent.target_id == query.target_id)
    if query.since:
        stmt = stmt.where(AuditEvent.at >= query.since)  # UtcDateTime: aware, in UTC
    page = paginate(session(), stmt, AuditEvent.seq, limit=query.limit, cursor=query.cursor, descending=True)
    return AuditEventList(
        items=[
            AuditEventOut(
                id=e.id,
                seq=e.seq,
                at=e.at,
                actor=Ref(type=e.actor_type, id=e.actor_id),
                action=e.action,
                target=Ref(type=e.target_type, id=e.target_id),
                request_id=e.request_id,
                ip=e.ip,
                details=e.details,
                hash=e.hash,
                prev_hash=e.prev_hash,
            )
            for e in page.items
        ],
        next_cursor=page.next_cursor,
    )
