"""The caller, their API tokens, and org memberships."""

from __future__ import annotations

from app.api import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import (
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
from app.models import ApiToken


def _token_out(t: ApiToken) -> TokenOut:
    return TokenOut(
        id=t.id,
        name=t.name,
        prefix=t.prefix,
        created_at=t.created_at,
        expires_at=t.expires_at,
        last_used_at=t.last_used_at,
        revoked_at=t.revoked_at,
    )


@route(bp, "/me", "GET", response=MeOut, tags=["identity"], errors=[401])
def me() -> MeOut:
    """Who the token belongs to, and their orgs and roles."""
    user = current_user()
    orgs = [OrgRef(slug=a.org.slug, name=a.org.name, role=a.role.value) for a in identity.orgs_of(session(), user)]
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
    """Create an API token for the caller; the token is shown once, in this response."""
    token, raw = identity.create_token(session(), request_context(), current_user(), body.name, body.expires_at)
    out = TokenCreated(**_token_out(token).model_dump(), token=raw)
    return Result(out, 201, {"Cache-Control": "no-store"})


@route(bp, "/me/tokens/<token_id>", "DELETE", status=204, tags=["identity"], errors=[401, 404])
def revoke_token(token_id: str) -> None:
    """Revoke one of the caller's API tokens."""
    identity.revoke_token(session(), request_context(), current_user(), token_id)


def _member_list(org: str) -> MemberList:
    access = identity.org_access(session(), current_user(), org)
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


@route(
    bp,
    "/orgs/<org>/members",
    "POST",
    body=MemberAdd,
    response=MemberOut,
    status=201,
    tags=["identity"],
    errors=[401, 403, 404, 422],
)
def add_member(org: str, body: MemberAdd) -> Result:
    """Add an existing user to the org (org admin)."""
    access = identity.org_access(session(), current_user(), org)
    access.require_admin()
    user = identity.get_user_by_email(session(), body.email)
    m = identity.add_member(session(), request_context(), access.org, user, body.role)
    return Result(MemberOut(user_id=user.id, email=user.email, role=m.role, created_at=m.created_at), 201)


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
    access = identity.org_access(session(), current_user(), org)
    access.require_admin()
    member = identity.get_member(session(), access.org, user_id)
    m = identity.add_member(session(), request_context(), access.org, member, body.role)
    return MemberOut(user_id=member.id, email=member.email, role=m.role, created_at=m.created_at)


@route(bp, "/orgs/<org>/members/<user_id>", "DELETE", status=204, tags=["identity"], errors=[401, 403, 404, 409])
def remove_member(org: str, user_id: str) -> None:
    """Remove a member from the org (org admin); the last admin cannot leave."""
    access = identity.org_access(session(), current_user(), org)
    access.require_admin()
    identity.remove_member(session(), request_context(), access.org, user_id)
