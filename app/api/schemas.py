"""Request and response models: they validate input and generate the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.pagination import CURSOR_PATTERN, DEFAULT_LIMIT, MAX_CURSOR, MAX_LIMIT
from app.schemas import Strict, UtcDateTime
from app.secrets.service import MAX_ALLOWED_HOSTS, MAX_DESCRIPTION, NAME_RE


class ListQuery(Strict):
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    # Declared with its shape, checked (with its signature) by app.pagination: any bad cursor is
    # one answer, 400 invalid_cursor, rather than a 422 for some shapes and a 400 for others.
    cursor: str | None = Field(
        default=None,
        description="Opaque: the next_cursor of the previous page, unchanged (signed; any other is a 400).",
        json_schema_extra={"pattern": CURSOR_PATTERN, "maxLength": MAX_CURSOR},
    )


# Secrets ---------------------------------------------------------------------------------

SECRET_NAME = Field(pattern=NAME_RE.pattern, description="Unique per org.")
SECRET_VALUE = Field(min_length=1, description="Non-empty UTF-8, at most 64 KiB. Never returned by reads.")
HOSTS = Field(
    default=None,
    max_length=MAX_ALLOWED_HOSTS,
    description="Hosts this secret may be sent to: exact names or '*.suffix' patterns. Empty: any host.",
)


class SecretCreate(Strict):
    name: str = SECRET_NAME
    value: str = SECRET_VALUE
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    allowed_hosts: list[str] | None = HOSTS


class SecretUpdate(Strict):
    name: str | None = Field(default=None, pattern=NAME_RE.pattern)
    value: str | None = Field(default=None, min_length=1)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    allowed_hosts: list[str] | None = HOSTS


class SecretUserOut(BaseModel):
    type: str = Field(description="provider | mcp_server | agent")
    id: str
    name: str


class SecretOut(BaseModel):
    id: str
    name: str
    description: str | None
    version: int
    value_hint: str | None = Field(description="Last 4 characters of values of 20+ characters, else null.")
    allowed_hosts: list[str]
    created_at: datetime
    updated_at: datetime
    rotated_at: datetime | None
    created_by: str | None
    updated_by: str | None
    used_by: list[SecretUserOut]


class SecretList(BaseModel):
    items: list[SecretOut]
    next_cursor: str | None


class SecretRevealed(BaseModel):
    value: str = Field(description="The current value. Never cached: the answer carries Cache-Control: no-store.")
    version: int = Field(description="The version this value belongs to.")


# Audit -----------------------------------------------------------------------------------


class AuditQuery(ListQuery):
    action: str | None = Field(default=None, max_length=64)
    target_type: str | None = Field(default=None, max_length=32)
    target_id: str | None = Field(default=None, max_length=64)
    since: UtcDateTime | None = None


class Ref(BaseModel):
    type: str | None
    id: str | None


class AuditEventOut(BaseModel):
    id: str
    seq: int
    at: datetime
    actor: Ref
    action: str
    target: Ref
    request_id: str | None
    ip: str | None
    details: dict[str, Any]
    hash: str
    prev_hash: str


class AuditEventList(BaseModel):
    items: list[AuditEventOut]
    next_cursor: str | None


# Identity --------------------------------------------------------------------------------


class OrgRef(BaseModel):
    slug: str
    name: str
    role: str


class MeOut(BaseModel):
    id: str
    email: str
    is_operator: bool
    orgs: list[OrgRef]


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=100)
    expires_at: UtcDateTime | None = None


class TokenOut(BaseModel):
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
    email: str = Field(max_length=320)
    role: str = Field(pattern="^(admin|member)$")


class MemberUpdate(Strict):
    role: str = Field(pattern="^(admin|member)$")


class MemberOut(BaseModel):
    user_id: str
    email: str
    role: str
    created_at: datetime


class MemberList(BaseModel):
    items: list[MemberOut]
    next_cursor: str | None = None


class InvitationOut(BaseModel):
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


# Jobs ------------------------------------------------------------------------------------


class Progress(BaseModel):
    done: int
    total: int | None


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: str = Field(description="queued | running | succeeded | failed")
    progress: Progress
    result: dict[str, Any] | None
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobAccepted(BaseModel):
    job: JobOut
