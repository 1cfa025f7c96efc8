"""Identity's input and output models: orgs, users and passwords, the caller, API tokens, memberships, invitations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from app.identity.catalog import (
    check_password_length,
    check_slug,
    check_token_name,
    in_the_future,
    normalize_email,
    org_name,
)
from app.schemas import Out, Strict, UtcDateTime, checked

RoleName = Annotated[str, Field(pattern="^(admin|member)$")]
Password = Annotated[str, checked(check_password_length)]


class OrgCreate(Strict):
    slug: Annotated[str, checked(check_slug)]
    name: str | None = None

    @property
    def display_name(self) -> str:
        return org_name(self.name, self.slug)


class UserCreate(Strict):
    email: Annotated[str, checked(normalize_email)]
    # repr=False (both models): a model holding a password may end up in a log line or a traceback.
    password: Password | None = Field(default=None, repr=False, description="None: API tokens only, no sign-in.")
    operator: bool = Field(default=False, description="An instance operator.")


class PasswordSet(Strict):
    password: Password = Field(repr=False)


class OrgRef(Out):
    slug: str
    name: str
    role: str


class MeOut(Out):
    id: str
    email: str
    is_operator: bool
    orgs: list[OrgRef]


class TokenCreate(Strict):
    name: Annotated[str, Field(min_length=1, max_length=100), checked(check_token_name)]
    expires_at: Annotated[UtcDateTime, checked(in_the_future)] | None = None


class TokenOut(Out):
    id: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    parent_id: str | None = Field(default=None, description="The token that minted this one, if any.")


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself; shown only in this response.")


class TokenList(BaseModel):
    items: list[TokenOut]
    next_cursor: str | None = None


class MemberAdd(Strict):
    email: Annotated[str, Field(max_length=320), checked(normalize_email)]
    role: RoleName


class MemberUpdate(Strict):
    role: RoleName


class MemberOut(Out):
    user_id: str
    email: str
    role: str
    created_at: datetime


class MemberList(BaseModel):
    items: list[MemberOut]
    next_cursor: str | None = None


class InvitationOut(Out):
    id: str
    email: str
    role: str
    created_at: datetime
    expires_at: datetime
    status: str = Field(description="pending, accepted, revoked or expired")


class InvitationCreated(InvitationOut):
    token: str = Field(description="The accept token; shown only in this response. Hand it to the invitee.")
    accept_path: str = Field(description="The UI page that accepts it: prefix with this instance's base URL.")


class InvitationList(BaseModel):
    items: list[InvitationOut]
    next_cursor: str | None = None


class InvitationAccept(Strict):
    token: str = Field(min_length=1, max_length=200)
