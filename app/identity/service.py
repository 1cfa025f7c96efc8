"""Orgs, users, memberships and API tokens."""

from __future__ import annotations

import hashlib
import re
import secrets as _random
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.db import utcnow
from app.errors import ConflictError, ForbiddenError, NotFoundError, UnauthorizedError, ValidationFailedError
from app.models import ApiToken, Membership, Org, Role, User

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
TOKEN_PREFIX = "lk_"  # noqa: S105 - a marker, not a token
# last_used_at is written at most this often per token, so reads stay reads.
LAST_USED_GRANULARITY = timedelta(minutes=1)

_hasher = PasswordHasher()


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if not EMAIL_RE.match(email):
        raise ValidationFailedError.single("email", "not a valid email address")
    return email


def create_org(session: Session, ctx: RequestContext, slug: str, name: str | None = None) -> Org:
    """Create an org; the slug is its path segment in the API."""
    if not SLUG_RE.match(slug):
        raise ValidationFailedError.single("slug", "lowercase letters, digits and inner hyphens, 1 to 63 characters")
    if session.scalar(select(Org.id).where(Org.slug == slug)):
        raise ConflictError(f"org {slug!r} already exists")
    org = Org(slug=slug, name=(name or slug)[:200])
    session.add(org)
    session.flush()
    audit.record(session, ctx, "org.create", org_id=org.id, target_type="org", target_id=org.id, details={"slug": slug})
    return org


def get_org(session: Session, slug: str) -> Org:
    org = session.scalar(select(Org).where(Org.slug == slug))
    if org is None:
        raise NotFoundError(f"org {slug!r} not found")
    return org


def hash_password(password: str) -> str:
    if len(password) < 12:
        raise ValidationFailedError.single("password", "must be at least 12 characters")
    if len(password) > 1024:
        raise ValidationFailedError.single("password", "must be at most 1024 characters")
    return _hasher.hash(password)


def create_user(
    session: Session, ctx: RequestContext, email: str, password: str | None = None, *, operator: bool = False
) -> User:
    """Create a user (an instance operator when ``operator``)."""
    email = normalize_email(email)
    if session.scalar(select(User.id).where(User.email == email)):
        raise ConflictError(f"user {email!r} already exists")
    user = User(email=email, password_hash=hash_password(password) if password else None, is_operator=operator)
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


def set_password(session: Session, ctx: RequestContext, user: User, password: str) -> None:
    user.password_hash = hash_password(password)
    audit.record(session, ctx, "user.set_password", org_id=None, target_type="user", target_id=user.id)


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


def _parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise ValidationFailedError.single("role", "must be 'admin' or 'member'") from None


def add_member(session: Session, ctx: RequestContext, org: Org, user: User, role: str) -> Membership:
    """Add a user to an org with a role (or change the role of an existing member)."""
    parsed = _parse_role(role)
    membership = session.get(Membership, (org.id, user.id))
    action = "membership.update" if membership else "membership.create"
    if membership is None:
        membership = Membership(org_id=org.id, user_id=user.id, role=parsed.value)
        session.add(membership)
    else:
        if membership.role == Role.ADMIN and parsed is Role.MEMBER:
            _ensure_another_admin(session, org, user)
        membership.role = parsed.value
    session.flush()
    audit.record(
        session,
        ctx,
        action,
        org_id=org.id,
        target_type="membership",
        target_id=user.id,
        details={"user_id": user.id, "role": parsed.value},
    )
    return membership


def get_member(session: Session, org: Org, user_id: str) -> User:
    """A member of this org; anyone else is not found."""
    user = session.scalar(
        select(User)
        .join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org.id, User.id == user_id)
    )
    if user is None:
        raise NotFoundError("member not found")
    return user


def remove_member(session: Session, ctx: RequestContext, org: Org, user_id: str) -> None:
    membership = session.get(Membership, (org.id, user_id))
    if membership is None:
        raise NotFoundError("member not found")
    if membership.role == Role.ADMIN:
        user = session.get(User, user_id)
        assert user is not None
        _ensure_another_admin(session, org, user)
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


def list_members(session: Session, org: Org) -> list[tuple[Membership, User]]:
    rows = session.execute(
        select(Membership, User)
        .join(User, User.id == Membership.user_id)
        .where(Membership.org_id == org.id)
        .order_by(User.email)
    ).all()
    return [(m, u) for m, u in rows]


@dataclass(frozen=True)
class OrgAccess:
    org: Org
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_admin(self) -> None:
        if not self.is_admin:
            raise ForbiddenError("this action needs the org admin role")


def org_access(session: Session, user: User, slug: str) -> OrgAccess:
    """The caller's role in an org; an org they do not belong to is simply not found."""
    row = session.execute(
        select(Org, Membership.role)
        .join(Membership, Membership.org_id == Org.id)
        .where(Org.slug == slug, Membership.user_id == user.id)
    ).first()
    if row is None:
        raise NotFoundError("org not found")
    return OrgAccess(row[0], Role(row[1]))


def orgs_of(session: Session, user: User) -> list[OrgAccess]:
    rows = session.execute(
        select(Org, Membership.role)
        .join(Membership, Membership.org_id == Org.id)
        .where(Membership.user_id == user.id)
        .order_by(Org.slug)
    ).all()
    return [OrgAccess(o, Role(r)) for o, r in rows]


# API tokens ------------------------------------------------------------------------------


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(
    session: Session, ctx: RequestContext, user: User, name: str = "api", expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """Mint a token; the plaintext is returned once and only its hash is stored."""
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise ValidationFailedError.single("name", "1 to 100 characters")
    if expires_at is not None and expires_at <= utcnow():
        raise ValidationFailedError.single("expires_at", "must be in the future")
    raw = TOKEN_PREFIX + _random.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=name, token_hash=_token_hash(raw), prefix=raw[:10], expires_at=expires_at)
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
        details={"user_id": user.id, "name": name, "expires_at": expires_at.isoformat() if expires_at else None},
    )
    return token, raw


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(session: Session, ctx: RequestContext, user: User, token_id: str) -> ApiToken:
    token = session.scalar(select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id))
    if token is None:
        raise NotFoundError("token not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(
            session,
            ctx,
            "token.revoke",
            org_id=None,
            target_type="api_token",
            target_id=token.id,
            details={"user_id": user.id},
        )
    return token


def authenticate_token(session: Session, raw: str) -> tuple[User, ApiToken]:
    """Resolve a bearer token to its user; expired, revoked or unknown tokens are all 401."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        raise UnauthorizedError("invalid API token")
    row = session.execute(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == _token_hash(raw))
    ).first()
    if row is None:
        raise UnauthorizedError("invalid API token")
    token, user = row
    now = utcnow()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        raise UnauthorizedError("invalid API token")
    if user.disabled_at is not None:
        raise UnauthorizedError("invalid API token")
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_GRANULARITY:
        token.last_used_at = now
    return user, token
