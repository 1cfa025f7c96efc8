"""The caller, their API tokens, and org memberships."""

from __future__ import annotations

from datetime import timedelta

from flask import current_app, g, url_for

from app.access import OrgAccess, orgs_of
from app.api.blueprint import bp
from app.api.request import current_user, request_context, session
from app.api.routing import Result, route
from app.identity import service as identity
from app.identity.schemas import (
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
from app.models import ApiToken

TAGS = ["identity"]


def _org_ref(access: OrgAccess) -> OrgRef:
    return OrgRef.of(access.org, role=access.role.value)


@route(bp, "/me", "GET", response=MeOut, tags=TAGS, errors=[401])
def me() -> MeOut:
    """Who the token belongs to, and their orgs and roles."""
    user = current_user()
    return MeOut.of(user, orgs=[_org_ref(a) for a in orgs_of(session(), user)])


@route(bp, "/me/tokens", "GET", response=TokenList, tags=TAGS, errors=[401])
def list_tokens() -> TokenList:
    """The caller's API tokens (never the tokens themselves)."""
    return TokenList(items=[TokenOut.model_validate(t) for t in identity.list_tokens(session(), current_user())])


@route(
    bp,
    "/me/tokens",
    "POST",
    body=TokenCreate,
    response=TokenCreated,
    status=201,
    tags=TAGS,
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
    token, raw = identity.create_token(session(), request_context(), current_user(), body, parent=parent)
    return Result(TokenCreated.of(token, token=raw), 201, {"Cache-Control": "no-store"})


@route(bp, "/me/tokens/<token_id>", "DELETE", status=204, tags=TAGS, errors=[401, 404])
def revoke_token(token_id: str) -> None:
    """Revoke one of the caller's API tokens."""
    identity.revoke_token(session(), request_context(), current_user(), token_id)


@route(bp, "/orgs/<org>/members", "GET", response=MemberList, tags=TAGS, errors=[401, 404], org_role="member")
def list_members(access: OrgAccess) -> MemberList:
    """The org's members and their roles."""
    return MemberList(items=identity.list_members(session(), access))


@route(bp, "/me/sessions", "DELETE", status=204, tags=TAGS, errors=[401])
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
    tags=TAGS,
    errors=[401, 403, 404, 422],
    org_role="admin",
)
def add_member(access: OrgAccess, body: MemberAdd) -> Result:
    """Invite an email address to the org (org admin); the invitee accepts to become a member.

    The answer is the same whether or not the address has an account. The accept token is
    shown once, in this response; there is no mail delivery, so the admin hands it over.
    """
    ttl = timedelta(seconds=current_app.config["LATCHKEY_SETTINGS"].invitation_ttl_seconds)
    new = identity.invite(session(), request_context(), access, body, ttl)
    out = InvitationCreated.of(
        new.invitation,
        status=identity.invitation_status(new.invitation),
        token=new.token,
        accept_path=url_for("web.invitation", token=new.token),
    )
    return Result(out, 202, {"Cache-Control": "no-store"})


@route(
    bp,
    "/orgs/<org>/invitations",
    "GET",
    response=InvitationList,
    tags=TAGS,
    errors=[401, 403, 404],
    org_role="admin",
)
def list_invitations(access: OrgAccess) -> InvitationList:
    """The org's pending invitations (org admin); never their tokens."""
    invitations = identity.list_invitations(session(), access)
    return InvitationList(items=[InvitationOut.of(i, status=identity.invitation_status(i)) for i in invitations])


@route(
    bp,
    "/orgs/<org>/invitations/<invitation_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404, 409],
    org_role="admin",
)
def revoke_invitation(access: OrgAccess, invitation_id: str) -> None:
    """Revoke a pending invitation (org admin); an accepted one is 409 (remove the member instead)."""
    identity.revoke_invitation(session(), request_context(), access, invitation_id)


@route(
    bp,
    "/invitations/accept",
    "POST",
    body=InvitationAccept,
    response=OrgRef,
    tags=TAGS,
    errors=[401, 404, 422],
)
def accept_invitation(body: InvitationAccept) -> OrgRef:
    """Accept an invitation addressed to the caller's email: the membership is created now.

    Unknown, used, revoked, expired and other addresses' invitations are all 404.
    """
    return _org_ref(identity.accept_invitation(session(), request_context(), current_user(), body.token))


@route(
    bp,
    "/orgs/<org>/members/<user_id>",
    "PATCH",
    body=MemberUpdate,
    response=MemberOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422],
    org_role="admin",
)
def update_member(access: OrgAccess, user_id: str, body: MemberUpdate) -> MemberOut:
    """Change a member's role (org admin); the last admin cannot be demoted."""
    return identity.update_member(session(), request_context(), access, user_id, body)


@route(
    bp,
    "/orgs/<org>/members/<user_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404, 409],
    org_role="admin",
)
def remove_member(access: OrgAccess, user_id: str) -> None:
    """Remove a member from the org (org admin); the last admin cannot leave."""
    identity.remove_member(session(), request_context(), access, user_id)
