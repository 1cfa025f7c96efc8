"""Secrets' input and output models: the API bodies, the UI's form models and the service inputs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, field_validator
from pydantic_core import PydanticCustomError

from app.observability import redact
from app.schemas import Out, Patch, Strict, checked
from app.secrets.catalog import (
    MAX_ALLOWED_HOSTS,
    MAX_DESCRIPTION,
    NAME_RE,
    check_description,
    check_name,
    check_value,
    distinct,
    normalize_host,
)


def _mask(value: str) -> str:
    # Before anything can log it: the request's log lines mask the value from here on. Only the
    # request's own registry holds it (dropped at teardown): a web process keeps no value.
    redact.register_scoped(value)
    return value


Name = Annotated[str, checked(check_name), Field(json_schema_extra={"pattern": NAME_RE.pattern})]
Value = Annotated[str, Field(min_length=1), AfterValidator(_mask), checked(check_value)]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION), checked(check_description)]
Hosts = Annotated[list[Annotated[str, checked(normalize_host)]], AfterValidator(distinct)]
HOSTS = Field(
    default=None,
    max_length=MAX_ALLOWED_HOSTS,
    description="Hosts this secret may be sent to: exact names or '*.suffix' patterns. Empty: any host.",
)


class SecretCreate(Strict):
    name: Name = Field(description="Unique per org.")
    value: Value = Field(description="Non-empty UTF-8, at most 64 KiB. Never returned by reads.")
    description: Description | None = None
    allowed_hosts: Hosts | None = HOSTS


class SecretUpdate(Patch):
    """A partial edit: only the fields given change (``description``/``allowed_hosts`` null clears them)."""

    NOTHING_TO_CHANGE = "give at least one of value, name, description, allowed_hosts"

    name: Name | None = None
    value: Value | None = None
    description: Description | None = None
    allowed_hosts: Hosts | None = HOSTS

    @field_validator("name", "value")
    @classmethod
    def _not_null(cls, given: str | None) -> str:
        if given is None:  # only a field that was sent is validated: null names nothing to set
            raise PydanticCustomError("value_error", "must not be null")
        return given


class SecretUserOut(BaseModel):
    type: str = Field(description="provider | mcp_server | agent")
    id: str
    name: str


class SecretOut(Out):
    """A secret's metadata (``SecretOut.of(row, used_by=...)``); never its value."""

    id: str
    name: str
    description: str | None
    version: int
    value_hint: str | None = Field(description="Last 4 characters of values of 20+ characters, else null.")
    allowed_hosts: Annotated[list[str], BeforeValidator(lambda hosts: hosts or [])]
    created_at: datetime
    updated_at: datetime
    rotated_at: datetime | None
    created_by: str | None
    updated_by: str | None
    used_by: list[SecretUserOut]


class SecretList(Out):
    items: list[SecretOut]
    next_cursor: str | None


class SecretRevealed(Out):
    value: str = Field(description="The current value. Never cached: the answer carries Cache-Control: no-store.")
    version: int = Field(description="The version this value belongs to.")
