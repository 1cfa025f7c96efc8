"""The MCP server service on a rolled-back session: validation queued, who may bind a secret, tenancy."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.errors import ForbiddenError, NotFoundError, ValidationFailedError
from app.mcp import service as mcp
from app.mcp.schemas import McpServerCreate, McpServerUpdate
from app.models import Job, Org, Role
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate
from tests.support.factories import CTX

URL = "https://tools.example.test/mcp"


def test_create_queues_a_validation_of_the_new_server(db_session: Session, org_row: Org) -> None:
    server, job = mcp.create_server(
        db_session, CTX, OrgAccess(org_row, Role.ADMIN), McpServerCreate(name="Tools", url=URL)
    )
    assert server.status == "pending"
    stored = db_session.scalar(select(Job).where(Job.id == job.id))
    assert stored is not None and stored.status == "queued" and stored.org_id == org_row.id


def test_a_raw_token_is_refused(db_session: Session, org_row: Org) -> None:
    with pytest.raises(ValidationFailedError) as info:
        mcp.create_server(
            db_session, CTX, OrgAccess(org_row, Role.ADMIN), McpServerCreate(name="T", url=URL, token="x")
        )
    assert [e.field for e in info.value.errors] == ["token"]


def test_only_an_admin_binds_a_secret(db_session: Session, org_row: Org, public_keys: PublicKeySet) -> None:
    ref = secrets.create_secret(
        db_session,
        CTX,
        OrgAccess.system(org_row),
        public_keys,
        SecretCreate(name="MCP_TOKEN", value="mcp-token-0123456789"),
    ).id
    fields = McpServerCreate(name="Tools", url=URL, secret_ref=ref)
    with pytest.raises(ForbiddenError):
        mcp.create_server(db_session, CTX, OrgAccess(org_row, Role.MEMBER), fields)
    server, _job = mcp.create_server(db_session, CTX, OrgAccess(org_row, Role.ADMIN), fields)
    # And once bound, a member can neither re-point nor delete it.
    member = OrgAccess(org_row, Role.MEMBER)
    with pytest.raises(ForbiddenError):
        mcp.update_server(db_session, CTX, member, server.id, McpServerUpdate(url="https://elsewhere.example.test/mcp"))
    with pytest.raises(ForbiddenError):
        mcp.delete_server(db_session, CTX, member, server.id)


def test_another_orgs_server_is_not_found(db_session: Session, org_row: Org, other_org_row: Org) -> None:
    server, _job = mcp.create_server(
        db_session, CTX, OrgAccess(other_org_row, Role.ADMIN), McpServerCreate(name="Theirs", url=URL)
    )
    mine = OrgAccess(org_row, Role.ADMIN)
    with pytest.raises(NotFoundError):
        mcp.update_server(db_session, CTX, mine, server.id, McpServerUpdate(name="Mine"))
    with pytest.raises(NotFoundError):
        mcp.delete_server(db_session, CTX, mine, server.id)
