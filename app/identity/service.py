"""Orgs, users, memberships and API tokens."""

from __future__ import annotations

import hashlib
import secrets as _random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import ColumnElement, Exists, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.access import OrgAccess, OrgRole
from app.audit import service as audit
from app.context import RequestContext
from app.db import updated, utcnow
from app.errors import ConflictError, NotFoundError, UnauthorizedError, ValidationFailedError
from app.identity.schemas import MemberAdd, MemberOut, MemberUpdate, OrgCreate, PasswordSet, TokenCreate, UserCreate
from app.models import ApiToken, Invitation, Membership, Org, Role, User, WebSession

TOKEN_PREFIX = "lk_"  # noqa: S105 - a marker, not a token
INVITATION_PREFIX = "lki_"
# A token minted with a token minted with a token...: the chain checked at sign-in stays short.
MAX_TOKEN_DEPTH = 8
# last_used_at is written at most this often per token, so reads stay reads.
LAST_USED_GRANULARITY = timedelta(minutes=1)

_hasher = PasswordHasher()


def create_org(session: Session, ctx: RequestContext, data: OrgCreate) -> Org:
    """Create an org; the slug is its path segment in the API."""
    if session.scalar(select(Org.id).where(Org.slug == data.slug)):
        raise ConflictError(f"org {data.slug!r} already exists")
    org = Org(slug=data.slug, name=data.display_name)
    session.add(org)
    session.flush()
    audit.record(
        session, ctx, "org.create", org_id=org.id, target_type="org", target_id=org.id, details={"slug": data.slug}
    )
    return org


def get_org(session: Session, slug: str) -> Org:
    org = session.scalar(select(Org).where(Org.slug == slug))
    if org is None:
        raise NotFoundError(f"org {slug!r} not found")
    return org


def create_user(session: Session, ctx: RequestContext, data: UserCreate) -> User:
    """Create a user (an instance operator when ``data.operator``)."""
    email, operator = data.email, data.operator
    if session.scalar(select(User.id).where(User.email == email)):
        raise ConflictError(f"user {email!r} already exists")
    password_hash = _hasher.hash(data.password) if data.password is not None else None
    user = User(email=email, password_hash=password_hash, is_operator=operator)
    session.add(user)
    session.flush()
    audit.record(
        session,
        ctx,
        "user.create",
        org_id=None,
        target_type="user",
        target_id=user.id,
        details={"email": email, "operator": operator},
    )
    return user


def set_password(session: Session, ctx: RequestContext, user: User, data: PasswordSet) -> None:
    """Change a password; every web session of the user ends with it."""
    user.password_hash = _hasher.hash(data.password)
    audit.record(session, ctx, "user.set_password", org_id=None, target_type="user", target_id=user.id)
    revoke_sessions(session, ctx, user)


def get_user_by_email(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise NotFoundError(f"user {email.strip().lower()!r} not found")
    return user


def check_password(session: Session, email: str, password: str) -> User:
    """Verify a login; the same error whether the user or the password is wrong."""
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None or user.password_hash is None or user.disabled_at is not None:
        # Spend the same time as a real check, so timing does not reveal which emails exist.
        _hasher.hash("timing-equaliser")
        raise UnauthorizedError("invalid email or password")
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise UnauthorizedError("invalid email or password") from None
    return user


# Memberships -----------------------------------------------------------------------------


def _set_role(session: Session, ctx: RequestContext, org: Org, user: User, role: Role) -> Membership:
    """Make ``user`` a member of ``org`` with ``role`` (or change the role of an existing member)."""
    membership = session.get(Membership, (org.id, user.id))
    action = "membership.update" if membership else "membership.create"
    if membership is None:
        membership = Membership(org_id=org.id, user_id=user.id, role=role.value)
        session.add(membership)
    else:
        if membership.role == Role.ADMIN and role is Role.MEMBER:
            _ensure_another_admin(session, org, user)
            _revoke_invitations_by(session, ctx, org, user.id)
        membership.role = role.value
    session.flush()
    audit.record(
        session,
        ctx,
        action,
        org_id=org.id,
        target_type="membership",
        target_id=user.id,
        details={"user_id": user.id, "role": role.value},
    )
    return membership


def add_member(
    session: Session, ctx: RequestContext, access: OrgAccess, user: User, role: OrgRole | Role
) -> Membership:
    """Add a user to the org with a role, or change the role of a member (org admin)."""
    access.require_admin()
    return _set_role(session, ctx, access.org, user, Role(role))


def _member(session: Session, org: Org, user_id: str) -> User:
    """A member of this org; anyone else is not found."""
    user = session.scalar(
        select(User)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org.id, User.id == user_id)
    )
    if user is None:
        raise NotFoundError("member not found")
    return user


def update_member(
    session: Session, ctx: RequestContext, access: OrgAccess, user_id: str, data: MemberUpdate
) -> MemberOut:
    """Change a member's role (org admin); the last admin cannot be demoted."""
    access.require_admin()
    user = _member(session, access.org, user_id)
    return MemberOut.of(_set_role(session, ctx, access.org, user, Role(data.role)), email=user.email)


def remove_member(session: Session, ctx: RequestContext, access: OrgAccess, user_id: str) -> None:
    """Remove a member (org admin); the last admin cannot leave."""
    access.require_admin()
    org = access.org
    membership = session.get(Membership, (org.id, user_id))
    if membership is None:
        raise NotFoundError("member not found")
    if membership.role == Role.ADMIN:
        user = session.get(User, user_id)
        assert user is not None
        _ensure_another_admin(session, org, user)
        _revoke_invitations_by(session, ctx, org, user_id)
    session.delete(membership)
    session.flush()
    audit.record(
        session,
        ctx,
        "membership.delete",
        org_id=org.id,
        target_type="membership",
        target_id=user_id,
        details={"user_id": user_id},
    )


def _ensure_another_admin(session: Session, org: Org, leaving: User) -> None:
    admins = session.scalar(
        select(func.count())
        .select_from(Membership)
        .where(Membership.org_id == org.id, Membership.role == Role.ADMIN, Membership.user_id != leaving.id)
    )
    if not admins:
        raise ConflictError("an org must keep at least one admin")


def list_members(session: Session, access: OrgAccess) -> list[MemberOut]:
    """The org's members and their roles, by email."""
    rows = session.execute(
        select(Membership, User.email)
        .join(User, User.id == Membership.user_id)
        .where(Membership.org_id == access.org.id)
        .order_by(User.email)
    ).all()
    return [MemberOut.of(m, email=email) for m, email in rows]


# API tokens ------------------------------------------------------------------------------


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(
    session: Session, ctx: RequestContext, user: User, data: TokenCreate, *, parent: ApiToken | None = None
) -> tuple[ApiToken, str]:
    """Mint a token; the plaintext is returned once and only its hash is stored.

    ``parent`` is the token the request was authenticated with (API only): the new token records
    it, dies with it, and may not outlive it. Without ``expires_at`` it inherits the parent's
    expiry; a later ``expires_at`` is refused (422) rather than silently shortened.
    """
    name, expires_at = data.name, data.expires_at
    if parent is not None:
        if _token_depth(session, parent) >= MAX_TOKEN_DEPTH:
            raise ValidationFailedError.single(
                "body", f"tokens can be minted at most {MAX_TOKEN_DEPTH} levels deep; use a token from the CLI"
            )
        if parent.expires_at is not None:
            if expires_at is None:
                expires_at = parent.expires_at
            elif expires_at > parent.expires_at:
                raise ValidationFailedError.single(
                    "expires_at",
                    "must not be later than the expiry of the token used to create it "
                    f"({parent.expires_at.isoformat()})",
                )
    raw = TOKEN_PREFIX + _random.token_urlsafe(32)
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=_token_hash(raw),
        prefix=raw[:10],
        expires_at=expires_at,
        parent_id=parent.id if parent is not None else None,
    )
    session.add(token)
    try:
        session.flush()
    except IntegrityError:  # pragma: no cover - a 256-bit collision
        raise ConflictError("token collision; try again") from None
    audit.record(
        session,
        ctx,
        "token.create",
        org_id=None,
        target_type="api_token",
        target_id=token.id,
        details={
            "user_id": user.id,
            "name": name,
            "expires_at": expires_at.isoformat() if expires_at else None,
            "parent_id": token.parent_id,
        },
    )
    return token, raw


def _token_depth(session: Session, token: ApiToken) -> int:
    depth, parent_id = 0, token.parent_id
    while parent_id is not None and depth <= MAX_TOKEN_DEPTH:
        depth += 1
        parent_id = session.scalar(select(ApiToken.parent_id).where(ApiToken.id == parent_id))
    return depth


def _token_alive(token: ApiToken, now: datetime) -> bool:
    return token.revoked_at is None and (token.expires_at is None or token.expires_at > now)


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(session: Session, ctx: RequestContext, user: User, token_id: str) -> ApiToken:
    """Revoke a token and every token minted from it (they would fail authentication anyway)."""
    token = session.scalar(select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id))
    if token is None:
        raise NotFoundError("token not found")
    if token.revoked_at is None:
        now = utcnow()
        token.revoked_at = now
        descendants, level = 0, [token.id]
        for _ in range(MAX_TOKEN_DEPTH + 1):
            if not level:
                break
            level = list(session.scalars(select(ApiToken.id).where(ApiToken.parent_id.in_(level))))
            if level:
                descendants += updated(
                    session,
                    update(ApiToken)
                    .where(ApiToken.id.in_(level), ApiToken.revoked_at.is_(None))
                    .values(revoked_at=now),
                )
        audit.record(
            session,
            ctx,
            "token.revoke",
            org_id=None,
            target_type="api_token",
            target_id=token.id,
            details={"user_id": user.id, "descendants": descendants},
        )
    return token


# Every API request runs this: built once (building the select per call cost as much CPU as
# running it).
_TOKEN_LOOKUP = (
    select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == bindparam("token_hash"))
)


def authenticate_token(session: Session, raw: str) -> tuple[User, ApiToken]:
    """Resolve a bearer token to its user; expired, revoked or unknown tokens are all 401."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        raise UnauthorizedError("invalid API token")
    row = session.execute(_TOKEN_LOOKUP, {"token_hash": _token_hash(raw)}).first()
    if row is None:
        raise UnauthorizedError("invalid API token")
    token, user = row
    now = utcnow()
    if not _token_alive(token, now) or user.disabled_at is not None:
        raise UnauthorizedError("invalid API token")
    # A minted token lives only while every token above it does (revocation and expiry alike).
    parent_id, depth = token.parent_id, 0
    while parent_id is not None:
        parent = session.get(ApiToken, parent_id)
        depth += 1
        if parent is None or depth > MAX_TOKEN_DEPTH or not _token_alive(parent, now):
            raise UnauthorizedError("invalid API token")
        parent_id = parent.parent_id
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_GRANULARITY:
        token.last_used_at = now
    return user, token


# Web sessions ----------------------------------------------------------------------------

# last_seen_at of a web session is written at most this often.
SESSION_SEEN_GRANULARITY = timedelta(minutes=1)


def create_web_session(
    session: Session, user: User, lifetime: timedelta, *, ip: str | None, user_agent: str | None
) -> tuple[WebSession, str]:
    """A signed-in browser: the random id goes into the cookie, only its SHA-256 is stored."""
    raw = _random.token_urlsafe(32)
    now = utcnow()
    row = WebSession(
        user_id=user.id,
        token_hash=_token_hash(raw),
        created_at=now,
        expires_at=now + lifetime,
        last_seen_at=now,
        ip=(ip or "")[:64] or None,
        user_agent=(user_agent or "")[:200] or None,
    )
    session.add(row)
    session.flush()
    return row, raw


def authenticate_web_session(session: Session, raw: str) -> tuple[User, WebSession] | None:
    """The user of a live session (one indexed lookup), or None: revoked, expired, unknown, disabled."""
    if not raw or len(raw) > 100:
        return None
    row = session.execute(
        select(WebSession, User)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_hash == _token_hash(raw))
    ).first()
    if row is None:
        return None
    web, user = row
    if web.revoked_at is not None or web.expires_at <= utcnow() or user.disabled_at is not None:
        return None
    return user, web


def touch_web_session(session: Session, web: WebSession) -> bool:
    """Record activity, at most once per :data:`SESSION_SEEN_GRANULARITY`; True when it wrote."""
    now = utcnow()
    if web.last_seen_at is not None and now - web.last_seen_at < SESSION_SEEN_GRANULARITY:
        return False
    web.last_seen_at = now
    return True


def end_web_session(session: Session, raw: str) -> None:
    """Sign-out: the row is revoked, so a copy of the cookie no longer opens anything."""
    updated(
        session,
        update(WebSession)
        .where(WebSession.token_hash == _token_hash(raw), WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow()),
    )


def list_web_sessions(session: Session, user: User) -> list[WebSession]:
    """The user's live sessions, newest first."""
    return list(
        session.scalars(
            select(WebSession)
            .where(WebSession.user_id == user.id, WebSession.revoked_at.is_(None), WebSession.expires_at > utcnow())
            .order_by(WebSession.created_at.desc(), WebSession.id)
        )
    )


def revoke_sessions(session: Session, ctx: RequestContext, user: User) -> int:
    """Sign out everywhere: every live web session of the user is revoked (API tokens are not)."""
    count = updated(
        session,
        update(WebSession)
        .where(WebSession.user_id == user.id, WebSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False),
    )
    audit.record(
        session,
        ctx,
        "user.sessions_revoke",
        org_id=None,
        target_type="user",
        target_id=user.id,
        details={"sessions": count},
    )
    return count


# Invitations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NewInvitation:
    invitation: Invitation
    token: str


def _pending(org: Org) -> ColumnElement[bool]:
    """The WHERE clause of an org's invitations that are neither accepted nor revoked."""
    return (Invitation.org_id == org.id) & Invitation.accepted_at.is_(None) & Invitation.revoked_at.is_(None)


def invite(session: Session, ctx: RequestContext, access: OrgAccess, data: MemberAdd, ttl: timedelta) -> NewInvitation:
    """Offer membership to an email address (org admin); the same answer whether or not it has an account.

    An earlier pending invitation of the same address to this org is revoked: one live link
    per address. The token is returned once; only its SHA-256 is stored.
    """
    access.require_admin()
    org, email, role = access.org, data.email, Role(data.role)
    now = utcnow()
    updated(
        session,
        update(Invitation)
        .where(_pending(org), Invitation.email == email)
        .values(revoked_at=now)
        .execution_options(synchronize_session=False),
    )
    raw = INVITATION_PREFIX + _random.token_urlsafe(32)
    invitation = Invitation(
        org_id=org.id,
        email=email,
        role=role.value,
        token_hash=_token_hash(raw),
        invited_by=ctx.actor.id,
        expires_at=now + ttl,
    )
    session.add(invitation)
    session.flush()
    audit.record(
        session,
        ctx,
        "invitation.create",
        org_id=org.id,
        target_type="invitation",
        target_id=invitation.id,
        details={"email": email, "role": role.value, "expires_at": invitation.expires_at.isoformat()},
    )
    return NewInvitation(invitation, raw)


def invitation_status(invitation: Invitation, now: datetime | None = None) -> str:
    if invitation.accepted_at is not None:
        return "accepted"
    if invitation.revoked_at is not None:
        return "revoked"
    if invitation.expires_at <= (now or utcnow()):
        return "expired"
    return "pending"


def list_invitations(session: Session, access: OrgAccess) -> list[Invitation]:
    """The org's pending invitations (not accepted, revoked or expired), newest first (org admin)."""
    access.require_admin()
    return list(
        session.scalars(
            select(Invitation)
            .where(_pending(access.org), Invitation.expires_at > utcnow())
            .order_by(Invitation.created_at.desc(), Invitation.id)
        )
    )


def revoke_invitation(session: Session, ctx: RequestContext, access: OrgAccess, invitation_id: str) -> Invitation:
    """Revoke a pending invitation (org admin): one conditional UPDATE, so it cannot undo a concurrent accept.

    Nothing changed: an accepted invitation is a conflict, an unknown one not found, and an
    already revoked one stays revoked (idempotent, not audited again).
    """
    access.require_admin()
    org = access.org
    stmt = select(Invitation).where(Invitation.id == invitation_id, Invitation.org_id == org.id)
    invitation = session.scalar(stmt)
    if invitation is None:
        raise NotFoundError("invitation not found")
    revoked = _revoke_pending(session, ctx, org, invitation)
    # Re-read: the row as the conditional UPDATE left it, or as a concurrent accept did.
    invitation = session.scalar(stmt.execution_options(populate_existing=True))
    assert invitation is not None
    if not revoked and invitation.accepted_at is not None:
        raise ConflictError("the invitation was already accepted; remove the member instead")
    return invitation


def _revoke_pending(session: Session, ctx: RequestContext, org: Org, invitation: Invitation, **details: Any) -> bool:
    """Revoke ``invitation`` if it is still pending (one conditional UPDATE) and audit it; False otherwise."""
    if not updated(
        session,
        update(Invitation)
        .where(Invitation.id == invitation.id, _pending(org))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False),
    ):
        return False
    audit.record(
        session,
        ctx,
        "invitation.revoke",
        org_id=org.id,
        target_type="invitation",
        target_id=invitation.id,
        details={"email": invitation.email, **details},
    )
    return True


def _revoke_invitations_by(session: Session, ctx: RequestContext, org: Org, user_id: str) -> None:
    """An admin leaves or is demoted: the pending invitations they created die with their role."""
    pending = list(session.scalars(select(Invitation).where(_pending(org), Invitation.invited_by == user_id)))
    for invitation in pending:
        _revoke_pending(session, ctx, org, invitation, reason="inviter_no_longer_admin")


def _inviter_is_admin(invitation: Invitation) -> Exists:
    """SQL: whoever created the invitation is still an admin of its org."""
    return (
        select(Membership.user_id)
        .where(
            Membership.org_id == invitation.org_id,
            Membership.user_id == invitation.invited_by,
            Membership.role == Role.ADMIN,
        )
        .exists()
    )


def find_invitation(session: Session, user: User, raw: str) -> Invitation:
    """A pending invitation for this user's address; anything else is simply not found."""
    if not raw.startswith(INVITATION_PREFIX) or len(raw) > 200:
        raise NotFoundError(INVITATION_NOT_FOUND)
    invitation = session.scalar(select(Invitation).where(Invitation.token_hash == _token_hash(raw)))
    if invitation is None or invitation_status(invitation) != "pending" or invitation.email != user.email:
        raise NotFoundError(INVITATION_NOT_FOUND)
    # An invitation speaks for the admin who made it: once they are no longer one, it is void.
    if invitation.invited_by is None or not session.scalar(select(_inviter_is_admin(invitation))):
        raise NotFoundError(INVITATION_NOT_FOUND)
    return invitation


INVITATION_NOT_FOUND = "invitation not found: it may have expired, been used or revoked, or be for another address"


def accept_invitation(session: Session, ctx: RequestContext, user: User, raw: str) -> OrgAccess:
    """Join the org: single use (a conditional update), bound to the invited address.

    An invitee who is already a member keeps their current role; the invitation is used up.
    """
    invitation = find_invitation(session, user, raw)
    now = utcnow()
    claimed = updated(
        session,
        update(Invitation)
        .where(
            Invitation.id == invitation.id,
            Invitation.accepted_at.is_(None),
            Invitation.revoked_at.is_(None),
            Invitation.expires_at > now,
            _inviter_is_admin(invitation),
        )
        .values(accepted_at=now, accepted_by=user.id)
        .execution_options(synchronize_session=False),
    )
    if claimed != 1:
        raise NotFoundError(INVITATION_NOT_FOUND)
    org = session.get(Org, invitation.org_id)
    assert org is not None
    membership = session.get(Membership, (org.id, user.id))
    if membership is None:
        # The invitation speaks for the admin who made it (checked in the claim above).
        membership = _set_role(session, ctx, org, user, Role(invitation.role))
    audit.record(
        session,
        ctx,
        "invitation.accept",
        org_id=org.id,
        target_type="invitation",
        target_id=invitation.id,
        details={"user_id": user.id, "role": membership.role},
    )
    return OrgAccess(org, Role(membership.role))
