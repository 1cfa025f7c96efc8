"""The caller, their API tokens, and org memberships."""

from __future__ import annotations

from datetime import timedelta

from flask import current_app, g, url_for

from app.api.blueprint import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import (
    InvitationAccept,
    InvitationCreated,
    InvitationList,
    InvitationOut,
    MemberAdd,
    MemberList,
    MemberOut,
    MemberUpdate,
    MeOut,
    OrgRef,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
)
from app.identity import service as identity
from app.identity.access import org_access as access_of
from app.identity.access import orgs_of
from app.models import ApiToken, Invitation


def _token_out(t: ApiToken) -> TokenOut:
    return TokenOut(
        id=t.id,
        name=t.name,
        prefix=t.prefix,
        created_at=t.created_at,
        expires_at=t.expires_at,
        last_used_at=t.last_used_at,
        revoked_at=t.revoked_at,
        parent_id=t.parent_id,
    )


def _invitation_out(i: Invitation) -> InvitationOut:
    return InvitationOut(
        id=i.id,
        email=i.email,
        role=i.role,
        created_at=i.created_at,
        expires_at=i.expires_at,
        status=identity.invitation_status(i),
    )


@route(bp, "/me", "GET", response=MeOut, tags=["identity"], errors=[401])
def me() -> MeOut:
    """Who the token belongs to, and their orgs and roles."""
    user = current_user()
    orgs = [OrgRef(slug=a.org.slug, name=a.org.name, role=a.role.value) for a in orgs_of(session(), user)]
    return MeOut(id=user.id, email=user.email, is_operator=user.is_operator, orgs=orgs)


@route(bp, "/me/tokens", "GET", response=TokenList, tags=["identity"], errors=[401])
def list_tokens() -> TokenList:
    """The caller's API tokens (never the tokens themselves)."""
    return TokenList(items=[_token_out(t) for t in identity.list_tokens(session(), current_user())])


@route(
    bp,
    "/me/tokens",
    "POST",
    body=TokenCreate,
    response=TokenCreated,
    status=201,
    tags=["identity"],
    errors=[401, 422],
    idempotent=False,
)
def create_token(body: TokenCreate) -> Result:
    """Create an API token for the caller; the token is shown once, in this response.

    The new token is a child of the token that authenticated this request: it dies with it,
    and when that token expires, the new one expires no later (without ``expires_at`` it
    inherits that expiry; a later one is 422).
    """
    parent: ApiToken | None = g.get("api_token")
    token, raw = identity.create_token(
        session(), request_context(), current_user(), body.name, body.expires_at, parent=parent
    )
    out = TokenCreated(**_token_out(token).model_dump(), token=raw)
    return Result(out, 201, {"Cache-Control": "no-store"})


@route(bp, "/me/tokens/<token_id>", "DELETE", status=204, tags=["identity"], errors=[401, 404])
def revoke_token(token_id: str) -> None:
    """Revoke one of the caller's API tokens."""
    identity.revoke_token(session(), request_context(), current_user(), token_id)


def _member_list(org: str) -> MemberList:
    access = access_of(session(), current_user(), org)
    return MemberList(
        items=[
            MemberOut(user_id=u.id, email=u.email, role=m.role, created_at=m.created_at)
            for m, u in identity.list_members(session(), access.org)
        ]
    )


@route(bp, "/orgs/<org>/members", "GET", response=MemberList, tags=["identity"], errors=[401, 404])
def list_members(org: str) -> MemberList:
    """The org's members and their roles."""
    return _member_list(org)


@route(bp, "/me/sessions", "DELETE", status=204, tags=["identity"], errors=[401])
def revoke_sessions() -> None:
    """Sign out everywhere: every UI session of the caller ends (API tokens are not affected)."""
    identity.revoke_sessions(session(), request_context(), current_user())


@route(
    bp,
    "/orgs/<org>/members",
    "POST",
    body=MemberAdd,
    response=InvitationCreated,
    status=202,
    tags=["identity"],
    errors=[401, 403, 404, 422],
)
def add_member(org: str, body: MemberAdd) -> Result:
    """Invite an email address to the org (org admin); the invitee accepts to become a member.

    The answer is the same whether or not the address has an account. The accept token is
    shown once, in this response; there is no mail delivery, so the admin hands it over.
    """
    access = access_of(session(), current_user(), org)
    access.require_admin()
    ttl = timedelta(seconds=current_app.config["LATCHKEY_SETTINGS"].invitation_ttl_seconds)
    new = identity.invite(session(), request_context(), access.org, body.email, body.role, ttl)
    out = InvitationCreated(
        **_invitation_out(new.invitation).model_dump(),
        token=new.token,
        accept_path=url_for("web.invitation", token=new.token),
    )
    return Result(out, 202, {"Cache-Control": "no-store"})


@route(bp, "/orgs/<org>/invitations", "GET", response=InvitationList, tags=["identity"], errors=[401, 403, 404])
def list_invitations(org: str) -> InvitationList:
    """The org's pending invitations (org admin); never their tokens."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    return InvitationList(items=[_invitation_out(i) for i in identity.list_invitations(session(), access.org)])


@route(
    bp,
    "/orgs/<org>/invitations/<invitation_id>",
    "DELETE",
    status=204,
    tags=["identity"],
    errors=[401, 403, 404, 409],
)
def revoke_invitation(org: str, invitation_id: str) -> None:
    """Revoke a pending invitation (org admin); an accepted one is 409 (remove the member instead)."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    identity.revoke_invitation(session(), request_context(), access.org, invitation_id)


@route(
    bp,
    "/invitations/accept",
    "POST",
    body=InvitationAccept,
    response=OrgRef,
    tags=["identity"],
    errors=[401, 404, 422],
)
def accept_invitation(body: InvitationAccept) -> OrgRef:
    """Accept an invitation addressed to the caller's email: the membership is created now.

    Unknown, used, revoked, expired and other addresses' invitations are all 404.
    """
    org, membership = identity.accept_invitation(session(), request_context(), current_user(), body.token)
    return OrgRef(slug=org.slug, name=org.name, role=membership.role)


@route(
    bp,
    "/orgs/<org>/members/<user_id>",
    "PATCH",
    body=MemberUpdate,
    response=MemberOut,
    tags=["identity"],
    errors=[401, 403, 404, 409, 422],
)
def update_member(org: str, user_id: str, body: MemberUpdate) -> MemberOut:
    """Change a member's role (org admin); the last admin cannot be demoted."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    member = identity.get_member(session(), access.org, user_id)
    m = identity.add_member(session(), request_context(), access.org, member, body.role)
    return MemberOut(user_id=member.id, email=member.email, role=m.role, created_at=m.created_at)


@route(bp, "/orgs/<org>/members/<user_id>", "DELETE", status=204, tags=["identity"], errors=[401, 403, 404, 409])
def remove_member(org: str, user_id: str) -> None:
    """Remove a member from the org (org admin); the last admin cannot leave."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    identity.remove_member(session(), request_context(), access.org, user_id)
