"""The identity service on a rolled-back session: orgs, memberships and the last-admin rule, sign-in checks."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.errors import ConflictError, NotFoundError, UnauthorizedError, ValidationFailedError
from app.identity import service as identity
from app.identity.schemas import MemberUpdate, OrgCreate, UserCreate
from app.models import Org, Role, User
from app.schemas import validated
from tests.support.factories import CTX

PASSWORD = "unit-password-correct-horse"


def _user(session: Session, email: str) -> User:
    return identity.create_user(session, CTX, UserCreate(email=email, password=PASSWORD))


def _admin(org: Org) -> OrgAccess:
    return OrgAccess(org, Role.ADMIN)


def test_org_slugs_are_checked_and_unique(db_session: Session, org_row: Org) -> None:
    with pytest.raises(ConflictError):
        identity.create_org(db_session, CTX, OrgCreate(slug=org_row.slug))
    with pytest.raises(ValidationFailedError):
        identity.create_org(db_session, CTX, validated(OrgCreate, {"slug": "Not A Slug"}))


def test_the_last_admin_can_be_neither_removed_nor_demoted(db_session: Session, org_row: Org) -> None:
    access = _admin(org_row)
    admin = _user(db_session, "admin@unit.test")
    identity.add_member(db_session, CTX, access, admin, "admin")
    with pytest.raises(ConflictError):
        identity.remove_member(db_session, CTX, access, admin.id)
    with pytest.raises(ConflictError):
        identity.add_member(db_session, CTX, access, admin, "member")
    # With a second admin, the first may step down.
    identity.add_member(db_session, CTX, access, _user(db_session, "second@unit.test"), "admin")
    assert identity.add_member(db_session, CTX, access, admin, "member").role == Role.MEMBER


def test_a_member_of_another_org_is_not_found(db_session: Session, org_row: Org, other_org_row: Org) -> None:
    theirs = _user(db_session, "theirs@unit.test")
    identity.add_member(db_session, CTX, OrgAccess.system(other_org_row), theirs, "member")
    mine = _admin(org_row)
    # identity.get_member is gone: the member lookup now happens inside update_member.
    with pytest.raises(NotFoundError):
        identity.update_member(db_session, CTX, mine, theirs.id, MemberUpdate(role="member"))
    with pytest.raises(NotFoundError):
        identity.remove_member(db_session, CTX, mine, theirs.id)


def test_a_wrong_password_and_an_unknown_email_fail_alike(db_session: Session) -> None:
    user = _user(db_session, "Someone@Unit.test")
    assert identity.check_password(db_session, "someone@unit.test", PASSWORD).id == user.id
    with pytest.raises(UnauthorizedError) as wrong:
        identity.check_password(db_session, "someone@unit.test", "not-the-password")
    with pytest.raises(UnauthorizedError) as unknown:
        identity.check_password(db_session, "nobody@unit.test", PASSWORD)
    assert str(wrong.value) == str(unknown.value)
