"""Who may do what in an org: the caller's :class:`OrgAccess`, the one home of the role rule.

Edges (``route(org_role=...)``, ``page(org_role=...)``) resolve it once per request; services
that change an org's data take it and check their own rule (``access.require(Role.ADMIN)``), so
a new edge (a CLI command, a task path) cannot skip a rule by forgetting a line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ForbiddenError, NotFoundError
from app.models import Membership, Org, Role, User

OrgRole = Literal["member", "admin"]
"""What an edge declares it needs: any member of the org, or its admin."""


@dataclass(frozen=True)
class OrgAccess:
    org: Org
    role: Role

    @classmethod
    def system(cls, org: Org) -> OrgAccess:
        """Admin access for a trusted edge that acts on an org without being a member of it:
        the CLI (run by whoever runs the instance), a worker task, the dev seed, test setup."""
        return cls(org, Role.ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_admin(self) -> None:
        if not self.is_admin:
            raise ForbiddenError("this action needs the org admin role")

    def require(self, role: OrgRole | Role) -> None:
        """Raise 403 unless the caller holds ``role`` (an admin holds every role)."""
        if Role(role) is Role.ADMIN:
            self.require_admin()


def org_access(session: Session, user: User, slug: str) -> OrgAccess:
    """The caller's role in an org; an org they do not belong to is simply not found."""
    row = session.execute(
        select(Org, Membership.role)
        .join(Membership, Membership.org_id == Org.id)
        .where(Org.slug == slug, Membership.user_id == user.id)
    ).first()
    if row is None:
        raise NotFoundError("org not found")
    return OrgAccess(row[0], Role(row[1]))


def orgs_of(session: Session, user: User) -> list[OrgAccess]:
    rows = session.execute(
        select(Org, Membership.role)
        .join(Membership, Membership.org_id == Org.id)
        .where(Membership.user_id == user.id)
        .order_by(Org.slug)
    ).all()
    return [OrgAccess(o, Role(r)) for o, r in rows]
