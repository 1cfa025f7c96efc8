"""Token lineage and org invitations, over the real API (and the UI's invitation page)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update

from app.access import OrgAccess
from app.db import utcnow
from app.errors import ConflictError
from app.identity import service as identity
from app.identity.schemas import TokenCreate, UserCreate
from app.models import ApiToken, AuditEvent, Invitation, Membership
from tests.support.factories import CTX, Caller, Factory

# Tokens minted with tokens -----------------------------------------------------------------


def _expiring(factory: Factory, caller: Caller, expires_at: datetime | None) -> Caller:
    """Another token of the same user (as the CLI mints them: no parent), with this expiry."""
    with factory.db.session() as s:
        user = identity.get_user_by_email(s, caller.email)
        _tok, raw = identity.create_token(s, CTX, user, TokenCreate(name="parent", expires_at=expires_at))
    return Caller(caller.client, raw, caller.user_id, caller.email)


def _mint(caller: Caller, **body: Any) -> Caller:
    resp = caller.post("me/tokens", json={"name": "child", **body})
    assert resp.status_code == 201, resp.get_json()
    return Caller(caller.client, resp.get_json()["token"], caller.user_id, caller.email)


def _token_row(factory: Factory, raw: str) -> ApiToken:
    with factory.db.session() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.prefix == raw[:10]))
        assert row is not None
        s.expunge(row)
        return row


def test_a_token_minted_by_an_expiring_token_expires_no_later(factory: Factory) -> None:
    base = factory.user()
    until = (utcnow() + timedelta(hours=1)).replace(microsecond=0)
    parent = _expiring(factory, base, until)
    parent_row = _token_row(factory, parent.token)
    assert parent_row.parent_id is None  # minted outside the API: no parent
    # Without expires_at, the child inherits the parent's expiry.
    child = parent.post("me/tokens", json={"name": "child"})
    assert child.status_code == 201, child.get_json()
    body = child.get_json()
    assert body["parent_id"] == parent_row.id
    assert datetime.fromisoformat(body["expires_at"]) == until
    # Later than the parent: refused, not silently shortened.
    later = parent.post("me/tokens", json={"name": "later", "expires_at": (until + timedelta(seconds=1)).isoformat()})
    assert later.status_code == 422
    assert later.get_json()["errors"][0]["field"] == "expires_at"
    earlier = until - timedelta(minutes=30)
    ok = parent.post("me/tokens", json={"name": "earlier", "expires_at": earlier.isoformat()})
    assert ok.status_code == 201 and datetime.fromisoformat(ok.get_json()["expires_at"]) == earlier


def test_a_parent_without_expiry_allows_any(factory: Factory) -> None:
    base = factory.user()
    forever = _mint(base)
    assert _token_row(factory, forever.token).expires_at is None
    far = (utcnow() + timedelta(days=3650)).replace(microsecond=0)
    assert (
        datetime.fromisoformat(
            _mint(base, expires_at=far.isoformat()).get("me/tokens").get_json()["items"][-1]["expires_at"]
        )
        == far
    )


def test_descendants_die_when_the_parent_is_revoked(factory: Factory) -> None:
    base = factory.user()
    parent = _expiring(factory, base, None)
    child = _mint(parent)
    grandchild = _mint(child)
    assert grandchild.get("me").status_code == 200
    parent_id = _token_row(factory, parent.token).id
    assert base.delete(f"me/tokens/{parent_id}").status_code == 204
    for caller in (parent, child, grandchild):
        assert caller.get("me").status_code == 401
    # The cascade is visible in the list, and the unrelated token lives on.
    items = {t["id"]: t for t in base.get("me/tokens").get_json()["items"]}
    for raw in (child.token, grandchild.token):
        assert items[_token_row(factory, raw).id]["revoked_at"] is not None
    assert base.get("me").status_code == 200


def test_descendants_die_when_the_parent_expires_or_is_revoked_behind_the_api(factory: Factory) -> None:
    base = factory.user()
    parent = _expiring(factory, base, None)
    child = _mint(parent)
    grandchild = _mint(child)
    parent_id = _token_row(factory, parent.token).id
    # The parent's expiry passes (checked at authentication time, up the chain).
    with factory.db.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == parent_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert child.get("me").status_code == 401
    assert grandchild.get("me").status_code == 401
    # A revocation written straight into the row (no cascade ran) still ends the chain below it.
    with factory.db.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == parent_id).values(expires_at=None))
    assert grandchild.get("me").status_code == 200
    child_id = _token_row(factory, child.token).id
    with factory.db.session() as s:
        s.execute(update(ApiToken).where(ApiToken.id == child_id).values(revoked_at=utcnow()))
    assert grandchild.get("me").status_code == 401
    assert parent.get("me").status_code == 200


def test_token_chains_are_bounded(factory: Factory) -> None:
    caller = factory.user()
    for _ in range(identity.MAX_TOKEN_DEPTH):
        caller = _mint(caller)
    too_deep = caller.post("me/tokens", json={"name": "deeper"})
    assert too_deep.status_code == 422 and too_deep.get_json()["code"] == "validation_error"
    assert caller.get("me").status_code == 200


# Invitations --------------------------------------------------------------------------------


def _invite(admin: Caller, org: str, email: str, role: str = "member") -> dict[str, Any]:
    resp = admin.post(f"orgs/{org}/members", json={"email": email, "role": role})
    assert resp.status_code == 202, resp.get_json()
    assert resp.headers["Cache-Control"] == "no-store"
    body: dict[str, Any] = resp.get_json()
    return body


def _member_ids(admin: Caller, org: str) -> set[str]:
    return {m["user_id"] for m in admin.get(f"orgs/{org}/members").get_json()["items"]}


def test_inviting_answers_the_same_whether_or_not_the_address_exists(admin: Caller, org: str, factory: Factory) -> None:
    existing = factory.user()
    answers = []
    for email in (existing.email, "nobody-yet@example.test"):
        resp = admin.post(f"orgs/{org}/members", json={"email": email, "role": "member"})
        answers.append(resp)
    assert [r.status_code for r in answers] == [202, 202]
    assert answers[0].headers["Content-Type"] == answers[1].headers["Content-Type"]
    bodies = [r.get_json() for r in answers]
    assert (
        set(bodies[0])
        == set(bodies[1])
        == {
            "id",
            "email",
            "role",
            "created_at",
            "expires_at",
            "status",
            "token",
            "accept_path",
        }
    )
    for body in bodies:
        assert body["status"] == "pending" and body["role"] == "member"
        assert body["accept_path"] == f"/invitations/{body['token']}"
        ttl = datetime.fromisoformat(body["expires_at"]) - datetime.fromisoformat(body["created_at"])
        assert abs(ttl - timedelta(days=7)) < timedelta(minutes=1)
    # Nobody became a member by being invited.
    assert existing.user_id not in _member_ids(admin, org)


def test_the_invitee_accepts_once_and_becomes_a_member(admin: Caller, org: str, factory: Factory) -> None:
    invitee = factory.user()
    # The address as the admin typed it: matched case-insensitively.
    invitation = _invite(admin, org, invitee.email.upper(), "admin")
    assert invitation["email"] == invitee.email
    resp = invitee.post("invitations/accept", json={"token": invitation["token"]})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"slug": org, "name": org.title(), "role": "admin"}
    assert invitee.user_id in _member_ids(admin, org)
    assert invitee.get(f"orgs/{org}/audit-events").status_code == 200  # the role took effect
    # Single use.
    again = invitee.post("invitations/accept", json={"token": invitation["token"]})
    assert again.status_code == 404 and again.get_json()["code"] == "not_found"
    assert admin.get(f"orgs/{org}/invitations").get_json()["items"] == []


def test_an_invitation_is_bound_to_its_address(admin: Caller, org: str, factory: Factory) -> None:
    invitee, stranger = factory.user(), factory.user()
    invitation = _invite(admin, org, invitee.email)
    refused = stranger.post("invitations/accept", json={"token": invitation["token"]})
    assert refused.status_code == 404
    assert stranger.user_id not in _member_ids(admin, org)
    # Not used up by the refusal.
    assert invitee.post("invitations/accept", json={"token": invitation["token"]}).status_code == 200


def test_an_address_without_an_account_accepts_after_signing_up(admin: Caller, org: str, factory: Factory) -> None:
    invitation = _invite(admin, org, "later@example.test")
    with factory.db.session() as s:
        user = identity.create_user(s, CTX, UserCreate(email="later@example.test"))
        _tok, raw = identity.create_token(s, CTX, user, TokenCreate(name="t"))
        user_id = user.id
    later = Caller(admin.client, raw, user_id, "later@example.test")
    assert later.post("invitations/accept", json={"token": invitation["token"]}).status_code == 200
    assert user_id in _member_ids(admin, org)


def test_expired_revoked_and_replaced_invitations_cannot_be_accepted(admin: Caller, org: str, factory: Factory) -> None:
    invitee = factory.user()
    expired = _invite(admin, org, invitee.email)
    with factory.db.session() as s:
        s.execute(
            update(Invitation).where(Invitation.id == expired["id"]).values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert invitee.post("invitations/accept", json={"token": expired["token"]}).status_code == 404
    revoked = _invite(admin, org, invitee.email)
    listed = admin.get(f"orgs/{org}/invitations").get_json()["items"]
    assert [i["id"] for i in listed] == [revoked["id"]]
    assert "token" not in listed[0]
    assert admin.delete(f"orgs/{org}/invitations/{revoked['id']}").status_code == 204
    assert admin.delete(f"orgs/{org}/invitations/{revoked['id']}").status_code == 204  # idempotent
    assert invitee.post("invitations/accept", json={"token": revoked["token"]}).status_code == 404
    # A new invitation to the same address replaces the pending one.
    first, second = _invite(admin, org, invitee.email), _invite(admin, org, invitee.email)
    assert invitee.post("invitations/accept", json={"token": first["token"]}).status_code == 404
    assert invitee.post("invitations/accept", json={"token": second["token"]}).status_code == 200
    # Accepted: revoking is a conflict (remove the member instead).
    gone = admin.delete(f"orgs/{org}/invitations/{second['id']}")
    assert gone.status_code == 409 and gone.get_json()["code"] == "conflict"
    for junk in ("", "lk_not-an-invitation", "lki_" + "x" * 43, "lki_" + "x" * 300):
        resp = invitee.post("invitations/accept", json={"token": junk})
        assert resp.status_code in (404, 422), (junk, resp.status_code)
        assert resp.content_type == "application/problem+json"


def test_concurrent_accepts_of_one_invitation_use_it_once(app: Any, admin: Caller, org: str, factory: Factory) -> None:
    invitee = factory.user()
    invitation = _invite(admin, org, invitee.email)
    start = threading.Barrier(4)
    statuses: list[int] = []

    def accept() -> None:
        caller = Caller(app.test_client(), invitee.token, invitee.user_id, invitee.email)
        start.wait()
        statuses.append(caller.post("invitations/accept", json={"token": invitation["token"]}).status_code)

    threads = [threading.Thread(target=accept) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [200, 404, 404, 404], statuses
    with factory.db.session() as s:
        accepts = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "invitation.accept", AuditEvent.target_id == invitation["id"])
        ).all()
        assert len(accepts) == 1


def test_accepting_needs_a_token(client: FlaskClient, admin: Caller, org: str) -> None:
    invitation = _invite(admin, org, "someone@example.test")
    resp = client.post("/api/v1/invitations/accept", json={"token": invitation["token"]})
    assert resp.status_code == 401


def test_invitations_are_audited_without_their_tokens(admin: Caller, org: str, factory: Factory) -> None:
    invitee = factory.user()
    accepted = _invite(admin, org, invitee.email)
    assert invitee.post("invitations/accept", json={"token": accepted["token"]}).status_code == 200
    revoked = _invite(admin, org, "other@example.test")
    assert admin.delete(f"orgs/{org}/invitations/{revoked['id']}").status_code == 204
    with factory.db.session() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.target_type == "invitation")))
        dumped = json.dumps([[e.action, e.target_id, e.details] for e in events], default=str)
        by_action = {(e.action, e.target_id) for e in events}
    assert ("invitation.create", accepted["id"]) in by_action
    assert ("invitation.accept", accepted["id"]) in by_action
    assert ("invitation.revoke", revoked["id"]) in by_action
    for body in (accepted, revoked):
        assert body["token"] not in dumped
        assert body["token"].split("_", 1)[1][:16] not in dumped


def _pending_ids(admin: Caller, org: str) -> set[str]:
    return {i["id"] for i in admin.get(f"orgs/{org}/invitations").get_json()["items"]}


def test_removing_or_demoting_an_admin_revokes_the_invitations_they_created(
    admin: Caller, org: str, factory: Factory
) -> None:
    leaving, demoted = factory.user(org, "admin"), factory.user(org, "admin")
    invitees = [factory.user() for _ in range(3)]
    by_leaving = _invite(leaving, org, invitees[0].email)
    by_demoted = _invite(demoted, org, invitees[1].email, "admin")
    by_admin = _invite(admin, org, invitees[2].email)
    assert admin.delete(f"orgs/{org}/members/{leaving.user_id}").status_code == 204
    assert admin.patch(f"orgs/{org}/members/{demoted.user_id}", json={"role": "member"}).status_code == 200
    assert _pending_ids(admin, org) == {by_admin["id"]}
    for invitee, invitation in zip(invitees[:2], (by_leaving, by_demoted), strict=True):
        refused = invitee.post("invitations/accept", json={"token": invitation["token"]})
        assert refused.status_code == 404 and refused.get_json()["code"] == "not_found"
        assert invitee.user_id not in _member_ids(admin, org)
    assert invitees[2].post("invitations/accept", json={"token": by_admin["token"]}).status_code == 200
    with factory.db.session() as s:
        revokes = set(s.scalars(select(AuditEvent.target_id).where(AuditEvent.action == "invitation.revoke")))
    assert {by_leaving["id"], by_demoted["id"]} <= revokes


def test_an_invitation_whose_inviter_is_no_longer_an_admin_cannot_be_accepted(
    admin: Caller, org: str, factory: Factory
) -> None:
    inviter, invitee = factory.user(org, "admin"), factory.user()
    invitation = _invite(inviter, org, invitee.email, "admin")
    # The role is taken away behind the service (no revocation ran): accept still checks it.
    with factory.db.session() as s:
        s.execute(
            update(Membership)
            .where(Membership.user_id == inviter.user_id, Membership.org_id == identity.get_org(s, org).id)
            .values(role="member")
        )
    refused = invitee.post("invitations/accept", json={"token": invitation["token"]})
    assert refused.status_code == 404 and refused.get_json()["code"] == "not_found"
    assert invitee.user_id not in _member_ids(admin, org)


def test_revoking_never_undoes_an_accept_it_raced(admin: Caller, org: str, factory: Factory) -> None:
    invitee = factory.user()
    invitation = _invite(admin, org, invitee.email)
    assert factory.db.sessionmaker is not None
    revoker = factory.db.sessionmaker()
    try:
        # The revoking request has already read the invitation (pending) when the accept commits.
        found = identity.get_org(revoker, org)
        seen = revoker.get(Invitation, invitation["id"])
        assert seen is not None and seen.accepted_at is None
        revoker.commit()
        assert invitee.post("invitations/accept", json={"token": invitation["token"]}).status_code == 200
        with pytest.raises(ConflictError):
            identity.revoke_invitation(revoker, CTX, OrgAccess.system(found), invitation["id"])
        revoker.commit()
    finally:
        revoker.close()
    with factory.db.session() as s:
        row = s.get(Invitation, invitation["id"])
        assert row is not None and row.accepted_at is not None and row.revoked_at is None
    assert invitee.user_id in _member_ids(admin, org)
    missing = admin.delete(f"orgs/{org}/invitations/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
