"""The MCP server service on a rolled-back session: validation queued, who may bind a secret, tenancy."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.errors import ForbiddenError, NotFoundError, ValidationFailedError
from app.mcp import service as mcp
from app.mcp.schemas import HeaderIn, McpServerCreate, McpServerUpdate
from app.models import AuditEvent, Job, Org, Role
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


# --- header credentials -------------------------------------------------------------------------


def _secret(db_session: Session, org: Org, public_keys: PublicKeySet, name: str) -> str:
    return secrets.create_secret(
        db_session, CTX, OrgAccess.system(org), public_keys, SecretCreate(name=name, value=f"{name}-value-0123456789")
    ).id


def _header(name: str, ref: str, value: str = "{{secret}}") -> HeaderIn:
    return HeaderIn(name=name, template=value, secret_ref=ref)


def test_headers_are_stored_in_order_and_part_of_the_destination(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    key, tok = _secret(db_session, org_row, public_keys, "KEY"), _secret(db_session, org_row, public_keys, "TOK")
    admin = OrgAccess(org_row, Role.ADMIN)
    headers = [_header("X-API-Key", key), _header("Authorization", tok, "token {{secret}}")]
    server, job = mcp.create_server(db_session, CTX, admin, McpServerCreate(name="H", url=URL, headers=headers))
    assert [(h.name, h.template, h.secret_ref, h.position) for h in server.headers] == [
        ("X-API-Key", "{{secret}}", key, 0),
        ("Authorization", "token {{secret}}", tok, 1),
    ]
    assert job.params["headers"] == [
        {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key},
        {"name": "Authorization", "template": "token {{secret}}", "secret_ref": tok},
    ]
    # The secrets list the server among their users, once each: they cannot be deleted while in use.
    assert [u.id for u in secrets.get_secret(db_session, admin, key).used_by] == [server.id]
    # A header change re-queues validation; the same set again changes nothing.
    _same, none = mcp.update_server(db_session, CTX, admin, server.id, McpServerUpdate(headers=headers))
    assert none is None
    _server, job2 = mcp.update_server(db_session, CTX, admin, server.id, McpServerUpdate(headers=headers[:1]))
    assert job2 is not None and job2.params["headers"] == [job.params["headers"][0]]
    _server, job3 = mcp.update_server(db_session, CTX, admin, server.id, McpServerUpdate(headers=[]))
    assert job3 is not None and "headers" not in job3.params  # the destination of a server without headers
    assert secrets.get_secret(db_session, admin, key).used_by == []


def test_header_names_are_unique_case_insensitively_and_not_authorization_next_to_secret_ref(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    key = _secret(db_session, org_row, public_keys, "KEY")
    admin = OrgAccess(org_row, Role.ADMIN)
    twice = McpServerCreate(name="H", url=URL, headers=[_header("X-Key", key), _header("x-KEY", key)])
    with pytest.raises(ValidationFailedError) as info:
        mcp.create_server(db_session, CTX, admin, twice)
    assert [e.field for e in info.value.errors] == ["headers.1.name"]
    both = McpServerCreate(name="H", url=URL, secret_ref=key, headers=[_header("authorization", key)])
    with pytest.raises(ValidationFailedError) as info:
        mcp.create_server(db_session, CTX, admin, both)
    assert [e.field for e in info.value.errors] == ["headers.0.name"]
    # Binding secret_ref later to a server that already sends Authorization is refused too.
    server, _job = mcp.create_server(
        db_session, CTX, admin, McpServerCreate(name="H", url=URL, headers=[_header("Authorization", key)])
    )
    with pytest.raises(ValidationFailedError) as info:
        mcp.update_server(db_session, CTX, admin, server.id, McpServerUpdate(secret_ref=key))
    assert [e.field for e in info.value.errors] == ["secret_ref"]


def test_only_an_admin_binds_changes_or_removes_header_secrets(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    key = _secret(db_session, org_row, public_keys, "KEY")
    admin, member = OrgAccess(org_row, Role.ADMIN), OrgAccess(org_row, Role.MEMBER)
    with_header = McpServerCreate(name="H", url=URL, headers=[_header("X-Key", key)])
    with pytest.raises(ForbiddenError):
        mcp.create_server(db_session, CTX, member, with_header)
    server, _job = mcp.create_server(db_session, CTX, admin, with_header)
    for change in (
        McpServerUpdate(headers=[]),
        McpServerUpdate(headers=[_header("X-Other", key)]),
        McpServerUpdate(headers=[_header("X-Key", "no-such-secret")]),  # 403 before any lookup
        McpServerUpdate(url="https://elsewhere.example.test/mcp"),
    ):
        with pytest.raises(ForbiddenError):
            mcp.update_server(db_session, CTX, member, server.id, change)
    with pytest.raises(ForbiddenError):
        mcp.delete_server(db_session, CTX, member, server.id)
    # The set it already has is no change: a member may send it back (a form round trip).
    _server, job = mcp.update_server(
        db_session, CTX, member, server.id, McpServerUpdate(name="Renamed", headers=[_header("X-Key", key)])
    )
    assert job is None and server.name == "Renamed"


def test_another_orgs_header_secret_gets_the_answer_secret_ref_gets(
    db_session: Session, org_row: Org, other_org_row: Org, public_keys: PublicKeySet
) -> None:
    theirs = _secret(db_session, other_org_row, public_keys, "THEIRS")
    admin = OrgAccess(org_row, Role.ADMIN)
    with pytest.raises(ValidationFailedError) as as_ref:
        mcp.create_server(db_session, CTX, admin, McpServerCreate(name="R", url=URL, secret_ref=theirs))
    with pytest.raises(ValidationFailedError) as as_header:
        mcp.create_server(db_session, CTX, admin, McpServerCreate(name="H", url=URL, headers=[_header("X-K", theirs)]))
    with pytest.raises(ValidationFailedError) as missing:
        mcp.create_server(
            db_session, CTX, admin, McpServerCreate(name="H", url=URL, headers=[_header("X-K", "01234567-no-such")])
        )
    assert [e.field for e in as_header.value.errors] == ["headers.0.secret_ref"]
    assert [e.message for e in as_header.value.errors] == [e.message for e in as_ref.value.errors]
    assert [e.message for e in as_header.value.errors] == [e.message for e in missing.value.errors]


def test_audit_names_headers_and_secret_ids_never_values(
    db_session: Session, org_row: Org, public_keys: PublicKeySet
) -> None:
    key = _secret(db_session, org_row, public_keys, "KEY")
    admin = OrgAccess(org_row, Role.ADMIN)
    server, _job = mcp.create_server(
        db_session, CTX, admin, McpServerCreate(name="H", url=URL, headers=[_header("X-Key", key, "k {{secret}}")])
    )
    event = db_session.scalars(
        select(AuditEvent).where(AuditEvent.action == "mcp_server.create", AuditEvent.target_id == server.id)
    ).one()
    assert event.details["headers"] == [{"name": "X-Key", "secret_ref": key}]
    assert "KEY-value" not in str(event.details)
