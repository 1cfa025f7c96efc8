"""Managed secrets: create, read metadata, edit (versioned), delete.

The web tier seals with the public key set only; nothing here can open a ciphertext.
Plaintext lives in the request's memory and is gone when the request ends.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.db import flush_or_raise, new_id, utcnow
from app.errors import (
    ConflictError,
    NotFoundError,
    SecretInUseError,
    ValidationFailedError,
    VersionMismatchError,
)
from app.models import McpServer, Org, Provider, Secret
from app.observability import redact
from app.pagination import Page, paginate
from app.secrets import cachekeys, invalidation
from app.secrets.keyring import PublicKeySet
from app.secrets.sealing import seal, secret_context

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
MAX_VALUE_BYTES = 64 * 1024
MAX_DESCRIPTION = 1000
MAX_ALLOWED_HOSTS = 32
HINT_MIN_LENGTH = 20
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")


@dataclass(frozen=True)
class SecretUser:
    """A resource that references a secret (shown as ``used_by``)."""

    type: str
    id: str
    name: str

    def as_dict(self) -> dict[str, str]:
        return {"type": self.type, "id": self.id, "name": self.name}


# Validation (shared by the API and the UI) -------------------------------------------------


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValidationFailedError.single(
            "name", "must start with a letter or underscore and use only letters, digits, '_', '.', '-' (max 128)"
        )
    return name


def validate_value(value: Any) -> str:
    if not isinstance(value, str) or value == "":
        raise ValidationFailedError.single("value", "must be a non-empty string")
    # Before anything can log it: the request's log lines mask the value from here on. Only the
    # request's own registry holds it (dropped at teardown): a web process keeps no value.
    redact.register_scoped(value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationFailedError.single("value", "must be valid UTF-8 text") from None
    if size > MAX_VALUE_BYTES:
        raise ValidationFailedError.single("value", f"must be at most {MAX_VALUE_BYTES} bytes of UTF-8")
    return value


def validate_description(description: Any) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION or "\x00" in description:
        raise ValidationFailedError.single(
            "description", f"must be text of at most {MAX_DESCRIPTION} characters, without NUL"
        )
    return description


def validate_allowed_hosts(hosts: Any) -> list[str]:
    """Exact host names, ``*.suffix`` patterns or IP literals (IPv6 in brackets), each optionally
    pinned to a ``:port``; lowercased, canonical and de-duplicated. An entry without a port
    allows only the scheme's default port (``app.egress.guard.host_matches``)."""
    import ipaddress

    from app.egress.urls import UrlError, split_host_pattern

    if hosts is None:
        return []
    if not isinstance(hosts, list) or len(hosts) > MAX_ALLOWED_HOSTS:
        raise ValidationFailedError.single("allowed_hosts", f"must be a list of at most {MAX_ALLOWED_HOSTS} hosts")
    out: list[str] = []
    shape = "must be a host like 'api.example.com', a pattern like '*.example.com', or either with ':port'"
    for i, host in enumerate(hosts):
        if not isinstance(host, str):
            raise ValidationFailedError.single(f"allowed_hosts.{i}", "must be a host name")
        try:
            name, port = split_host_pattern(host.strip().lower())
        except UrlError as exc:
            raise ValidationFailedError.single(f"allowed_hosts.{i}", str(exc)) from None
        if name.startswith("[") or ":" in name:
            try:
                address = ipaddress.IPv6Address(name.removeprefix("[").removesuffix("]"))
            except ValueError:
                raise ValidationFailedError.single(f"allowed_hosts.{i}", shape) from None
            norm = f"[{address.compressed}]"
        else:
            norm = name.rstrip(".")
            if len(norm) > 253 or not HOST_RE.match(norm):
                raise ValidationFailedError.single(f"allowed_hosts.{i}", shape)
        if port is not None:
            norm = f"{norm}:{port}"
        if norm not in out:
            out.append(norm)
    return out


def value_hint(value: str) -> str | None:
    """The last 4 characters, only for values long enough that this reveals little."""
    return value[-4:] if len(value) >= HINT_MIN_LENGTH else None


# Queries ---------------------------------------------------------------------------------


def _managed(org_id: str) -> Any:
    return select(Secret).where(Secret.org_id == org_id, Secret.ciphertext.is_not(None))


def list_secrets(session: Session, org: Org, *, limit: int, cursor: str | None) -> Page[Secret]:
    """The org's managed secrets (metadata only), oldest first."""
    return paginate(session, _managed(org.id), Secret.id, limit=limit, cursor=cursor)


def get_secret(session: Session, org: Org, secret_id: str, *, for_update: bool = False) -> Secret:
    """One managed secret of this org; another org's id is simply not found."""
    stmt = _managed(org.id).where(Secret.id == secret_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    secret: Secret | None = session.scalar(stmt)
    if secret is None:
        raise NotFoundError("secret not found")
    return secret


def check_secret_ref(session: Session, org: Org, secret_ref: Any) -> str:
    """A reference to a managed secret of ``org`` (422 on ``secret_ref`` otherwise).

    Another org's secret looks exactly like a missing one.
    """
    if not isinstance(secret_ref, str) or not secret_ref:
        raise ValidationFailedError.single("secret_ref", "must be the id of a secret of this org")
    found = session.scalar(
        select(Secret.id).where(Secret.org_id == org.id, Secret.id == secret_ref, Secret.ciphertext.is_not(None))
    )
    if found is None:
        raise ValidationFailedError.single("secret_ref", "no secret with this id in this org")
    return secret_ref


def used_by(session: Session, org_id: str, secret_ids: list[str]) -> dict[str, list[SecretUser]]:
    """Every provider and MCP server referencing each secret."""
    users: dict[str, list[SecretUser]] = defaultdict(list)
    if not secret_ids:
        return users
    for model, kind in ((Provider, "provider"), (McpServer, "mcp_server")):
        rows = session.execute(
            select(model.secret_ref, model.id, model.name)
            .where(model.org_id == org_id, model.secret_ref.in_(secret_ids))
            .order_by(model.id)
        ).all()
        for ref, rid, name in rows:
            if ref is not None:
                users[ref].append(SecretUser(kind, rid, name))
    return users


# Mutations -------------------------------------------------------------------------------


def _check_name_free(session: Session, org: Org, name: str, exclude_id: str | None = None) -> None:
    stmt = select(Secret.id).where(Secret.org_id == org.id, Secret.name == name)
    if exclude_id:
        stmt = stmt.where(Secret.id != exclude_id)
    if session.scalar(stmt):
        raise ConflictError(f"a secret named {name!r} already exists in this org")


def _flush_unique(session: Session, name: str) -> None:
    flush_or_raise(session, ConflictError(f"a secret named {name!r} already exists in this org"))


def create_secret(
    session: Session,
    ctx: RequestContext,
    org: Org,
    keys: PublicKeySet,
    *,
    name: Any,
    value: Any,
    description: Any = None,
    allowed_hosts: Any = None,
) -> Secret:
    """Seal a new secret at version 1."""
    name = validate_name(name)
    value = validate_value(value)
    description = validate_description(description)
    hosts = validate_allowed_hosts(allowed_hosts)
    _check_name_free(session, org, name)
    secret_id = new_id()
    sealed = seal(keys, value.encode("utf-8"), secret_context(org.id, secret_id, 1))
    now = utcnow()
    secret = Secret(
        id=secret_id,
        org_id=org.id,
        name=name,
        description=description,
        ciphertext=sealed.ciphertext,
        key_id=sealed.key_id,
        version=1,
        value_hint=value_hint(value),
        allowed_hosts=hosts,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(secret)
    _flush_unique(session, name)
    audit.record(
        session,
        ctx,
        "secret.create",
        org_id=org.id,
        target_type="secret",
        target_id=secret.id,
        details={"name": name, "version": 1, "key_id": sealed.key_id, "allowed_hosts": hosts},
    )
    return secret


def parse_if_match(header: str | None) -> int | None:
    """``If-Match: "3"`` (or ``W/"3"``, or ``*``) -> 3 / None; anything else never matches."""
    if header is None or header.strip() == "*":
        return None
    tag = header.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"')
    if not tag.isdigit() or len(tag) > 12:
        return -1
    return int(tag)


def update_secret(
    session: Session,
    ctx: RequestContext,
    org: Org,
    keys: PublicKeySet,
    secret_id: str,
    changes: dict[str, Any],
    *,
    if_match: int | None = None,
) -> Secret:
    """Apply a partial edit; a new value re-seals under version + 1, atomically."""
    if not changes:
        raise ValidationFailedError.single("body", "give at least one of value, name, description, allowed_hosts")
    # Validate everything before touching the row, so a bad field changes nothing.
    new_value = validate_value(changes["value"]) if "value" in changes else None
    new_name = validate_name(changes["name"]) if "name" in changes else None
    new_description = validate_description(changes.get("description")) if "description" in changes else None
    new_hosts = validate_allowed_hosts(changes.get("allowed_hosts")) if "allowed_hosts" in changes else None

    # The row lock serialises concurrent edits (PostgreSQL); SQLite serialises writers anyway.
    secret = get_secret(session, org, secret_id, for_update=True)
    if if_match is not None and if_match != secret.version:
        raise VersionMismatchError(f"the secret is at version {secret.version}", current_version=secret.version)

    changed: list[str] = []
    previous_version = secret.version
    now = utcnow()
    if new_name is not None and new_name != secret.name:
        _check_name_free(session, org, new_name, exclude_id=secret.id)
        secret.name = new_name
        changed.append("name")
    if "description" in changes and new_description != secret.description:
        secret.description = new_description
        changed.append("description")
    if new_hosts is not None and new_hosts != (secret.allowed_hosts or []):
        secret.allowed_hosts = new_hosts
        changed.append("allowed_hosts")
    if new_value is not None:
        # The web tier cannot open the stored value to compare it, and storing a
        # comparable digest would give an offline guessing oracle: a supplied value
        # is a new value, and always a new version.
        version = secret.version + 1
        sealed = seal(keys, new_value.encode("utf-8"), secret_context(org.id, secret.id, version))
        secret.version = version
        secret.ciphertext = sealed.ciphertext
        secret.key_id = sealed.key_id
        secret.value_hint = value_hint(new_value)
        secret.rotated_at = now
        changed.append("value")
    if not changed:
        return secret
    secret.updated_at = now
    secret.updated_by = ctx.actor.id
    # In SQL, not from the loaded value: concurrent writers can never reuse a number, and the
    # cache pointer's order never depends on this host's clock.
    secret.revision = Secret.revision + 1
    _flush_unique(session, secret.name or "")
    invalidation.stage(session, org.id, secret.id, cachekeys.pointer(secret.version, secret.revision))
    audit.record(
        session,
        ctx,
        "secret.update",
        org_id=org.id,
        target_type="secret",
        target_id=secret.id,
        details={
            "name": secret.name,
            "changed": changed,
            "version": secret.version,
            "previous_version": previous_version,
            "key_id": secret.key_id,
        },
    )
    return secret


def delete_secret(session: Session, ctx: RequestContext, org: Org, secret_id: str) -> None:
    """Delete a secret that nothing references any more."""
    secret = get_secret(session, org, secret_id, for_update=True)
    users = used_by(session, org.id, [secret.id]).get(secret.id, [])
    if users:
        raise SecretInUseError(
            f"secret is used by {len(users)} resource(s); unbind it first", used_by=[u.as_dict() for u in users]
        )
    name, version = secret.name, secret.version
    session.delete(secret)
    # A reference added concurrently makes the composite foreign key refuse the delete.
    flush_or_raise(session, SecretInUseError("secret became in use; unbind it first", used_by=[]))
    invalidation.stage(session, org.id, secret_id, cachekeys.DELETED)
    audit.record(
        session,
        ctx,
        "secret.delete",
        org_id=org.id,
        target_type="secret",
        target_id=secret_id,
        details={"name": name, "version": version},
    )
