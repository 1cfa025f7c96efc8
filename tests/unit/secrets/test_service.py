"""The secrets service enforces the admin role itself: no edge can skip it by forgetting a line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from app.access import OrgAccess
from app.db import Database
from app.errors import ForbiddenError
from app.identity import service as identity
from app.models import AuditEvent, Job, Role, Secret
from app.secrets import reveal as reveals
from app.secrets import service as secrets
from app.secrets.keyring import Keyring
from app.secrets.schemas import SecretCreate, SecretUpdate
from tests.support.factories import CTX, Caller, Factory


def _counts(db: Database) -> tuple[int, int, int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(Secret)) or 0,
            s.scalar(select(func.max(Secret.version))) or 0,
            s.scalar(select(func.count()).select_from(AuditEvent)) or 0,
            s.scalar(select(func.count()).select_from(Job)) or 0,
        )


MUTATIONS: dict[str, Callable[..., Any]] = {
    "create": lambda s, access, keys, sid, app: secrets.create_secret(
        s, CTX, access, keys, SecretCreate(name="ANOTHER", value="v")
    ),
    "update": lambda s, access, keys, sid, app: secrets.update_secret(
        s, CTX, access, keys, sid, SecretUpdate(value="new-value")
    ),
    "delete": lambda s, access, keys, sid, app: secrets.delete_secret(s, CTX, access, sid),
    "reveal": lambda s, access, keys, sid, app: reveals.reveal(
        s,
        CTX,
        access,
        sid,
        redis=app.extensions["latchkey.redis"],
        timeout=1,
        rate_limit=10,
    ),
}


@pytest.mark.parametrize("operation", sorted(MUTATIONS))
def test_a_member_access_is_refused_by_the_service_and_changes_nothing(
    operation: str, app: Flask, db: Database, keyring: Keyring, factory: Factory, admin: Caller, org: str
) -> None:
    sid = factory.secret(admin, org)["id"]
    before = _counts(db)
    with db.session() as s:
        member = OrgAccess(identity.get_org(s, org), Role.MEMBER)
        with pytest.raises(ForbiddenError):
            MUTATIONS[operation](s, member, keyring.public_set(), sid, app)
        s.rollback()
    assert _counts(db) == before


def test_a_system_access_edits_like_an_admin(db: Database, keyring: Keyring, factory: Factory, org: str) -> None:
    with db.session() as s:
        access = OrgAccess.system(identity.get_org(s, org))
        created = secrets.create_secret(s, CTX, access, keyring.public_set(), SecretCreate(name="TASK", value="v1"))
        edited = secrets.update_secret(s, CTX, access, keyring.public_set(), created.id, SecretUpdate(value="v2"))
        assert (created.version, edited.version) == (1, 2)
        assert edited.used_by == []


def test_an_edit_changes_only_the_fields_it_was_given(
    db: Database, keyring: Keyring, factory: Factory, admin: Caller, org: str
) -> None:
    sid = factory.secret(admin, org, description="kept", allowed_hosts=["api.example.com"])["id"]
    with db.session() as s:
        access = OrgAccess.system(identity.get_org(s, org))
        out = secrets.update_secret(s, CTX, access, keyring.public_set(), sid, SecretUpdate(name="RENAMED"))
        assert (out.name, out.description, out.allowed_hosts, out.version) == (
            "RENAMED",
            "kept",
            ["api.example.com"],
            1,
        )
