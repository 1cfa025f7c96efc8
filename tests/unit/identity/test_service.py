"""Memberships and invitations: the identity service enforces the admin role itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from app.access import OrgAccess
from app.db import Database
from app.errors import ForbiddenError
from app.identity import service as identity
from app.identity.schemas import MemberAdd, MemberUpdate
from app.models import AuditEvent, Invitation, Membership, Role
from tests.support.factories import CTX, Caller, Factory

MUTATIONS: dict[str, Callable[..., Any]] = {
    "add_member": lambda s, access, other: identity.add_member(
        s, CTX, access, identity.get_user_by_email(s, other.email), Role.ADMIN
    ),
    "update_member": lambda s, access, other: identity.update_member(
        s, CTX, access, other.user_id, MemberUpdate(role="admin")
    ),
    "remove_member": lambda s, access, other: identity.remove_member(s, CTX, access, other.user_id),
    "invite": lambda s, access, other: identity.invite(
        s, CTX, access, MemberAdd(email="new@example.test", role="admin"), timedelta(days=1)
    ),
    "list_invitations": lambda s, access, other: identity.list_invitations(s, access),
}


def _counts(db: Database) -> tuple[int, ...]:
    with db.session() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(model)) or 0 for model in (Membership, Invitation, AuditEvent)
        )


@pytest.mark.parametrize("operation", sorted(MUTATIONS))
def test_a_member_access_is_refused_by_the_service_and_changes_nothing(
    operation: str, db: Database, factory: Factory, admin: Caller, member: Caller, org: str
) -> None:
    before = _counts(db)
    with db.session() as s:
        access = OrgAccess(identity.get_org(s, org), Role.MEMBER)
        with pytest.raises(ForbiddenError):
            MUTATIONS[operation](s, access, member)
        s.rollback()
    assert _counts(db) == before


def test_member_add_emails_are_normalised_by_the_model() -> None:
    assert MemberAdd(email="  Someone@Example.TEST ", role="member").email == "someone@example.test"
