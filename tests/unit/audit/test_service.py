"""The audit log is for org admins: the service itself refuses anyone else."""

from __future__ import annotations

import pytest

from app.access import OrgAccess
from app.audit import service as audit
from app.audit.schemas import AuditFilter
from app.db import Database
from app.errors import ForbiddenError
from app.identity import service as identity
from app.models import Role
from tests.support.factories import Factory


def test_a_member_cannot_list_the_audit_log(db: Database, factory: Factory, org: str) -> None:
    with db.session() as s:
        access = OrgAccess(identity.get_org(s, org), Role.MEMBER)
        with pytest.raises(ForbiddenError):
            audit.list_events(s, access, AuditFilter(), limit=10, cursor=None)
