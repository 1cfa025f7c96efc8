"""Managed secrets: create, read metadata, edit (versioned), delete.

The web tier seals with the public key set only; nothing here can open a ciphertext.
Plaintext lives in the request's memory and is gone when the request ends.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import ColumnClause, literal_column, select, union_all
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.db import flush_or_raise, new_id, utcnow
from app.errors import ConflictError, NotFoundError, SecretInUseError, ValidationFailedError, VersionMismatchError
from app.models import McpServer, McpServerHeader, Org, Provider, Secret
from app.pagination import Page, paginate
from app.secrets import cachekeys, invalidation
from app.secrets.catalog import value_hint
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate, SecretOut, SecretUpdate, SecretUserOut
from app.secrets.sealing import seal, secret_context

# Queries ---------------------------------------------------------------------------------


# An org's own secrets. A connection's tokens (kind "connection", app/mcp/tokens.py) are in the
# same table, for the same sealing, rotation and cache, but no one lists, reveals, edits or binds them.
MANAGED = "managed"


def _managed(org_id: str) -> Any:
    return select(Secret).where(Secret.org_id == org_id, Secret.kind == MANAGED, Secret.ciphertext.is_not(None))


def _row(session: Session, org: Org, secret_id: str, *, for_update: bool = False) -> Secret:
    """One managed secret of this org; another org's id is simply not found."""
    stmt = _managed(org.id).where(Secret.id == secret_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    secret: Secret | None = session.scalar(stmt)
    if secret is None:
        raise NotFoundError("secret not found")
    return secret


def _users(session: Session, org_id: str, secret_ids: list[str]) -> dict[str, list[SecretUserOut]]:
    """Every provider and MCP server referencing each secret (an MCP server as its bearer or in a header).

    One query (a UNION ALL of the three places a reference can be), in a stable order:
    providers, then MCP servers by bearer, then by header, each by id.
    """
    users: dict[str, list[SecretUserOut]] = defaultdict(list)
    if not secret_ids:
        return users
    none: ColumnClause[Any] = literal_column("0")
    stmt = union_all(
        select(literal_column("0").label("src"), Provider.secret_ref, Provider.id, Provider.name, none).where(
            Provider.org_id == org_id, Provider.secret_ref.in_(secret_ids)
        ),
        select(literal_column("1"), McpServer.secret_ref, McpServer.id, McpServer.name, none).where(
            McpServer.org_id == org_id, McpServer.secret_ref.in_(secret_ids)
        ),
        select(literal_column("2"), McpServerHeader.secret_ref, McpServer.id, McpServer.name, McpServerHeader.position)
        .join(McpServer, (McpServer.org_id == McpServerHeader.org_id) & (McpServer.id == McpServerHeader.mcp_server_id))
        .where(McpServerHeader.org_id == org_id, McpServerHeader.secret_ref.in_(secret_ids)),
    ).order_by(literal_column("1"), literal_column("3"), literal_column("5"))
    for src, ref, rid, name, _position in session.execute(stmt):
        if ref is None:
            continue
        user = SecretUserOut(type="provider" if src == 0 else "mcp_server", id=rid, name=name)
        if src < 2 or user not in users[ref]:  # once per server, however many of its headers use the secret
            users[ref].append(user)
    return users


def _out(session: Session, secret: Secret) -> SecretOut:
    return SecretOut.of(secret, used_by=_users(session, secret.org_id, [secret.id]).get(secret.id, []))


def list_secrets(session: Session, access: OrgAccess, *, limit: int, cursor: str | None) -> Page[SecretOut]:
    """The org's managed secrets (metadata and users, never values), oldest first."""
    page = paginate(session, _managed(access.org.id), Secret.id, limit=limit, cursor=cursor)
    users = _users(session, access.org.id, [s.id for s in page.items])
    return Page([SecretOut.of(s, used_by=users.get(s.id, [])) for s in page.items], page.next_cursor)


def get_secret(session: Session, access: OrgAccess, secret_id: str) -> SecretOut:
    """One managed secret's metadata and users; another org's id is simply not found."""
    return _out(session, _row(session, access.org, secret_id))


def check_secret_ref(session: Session, org: Org, secret_ref: str | None) -> str:
    """A reference to a managed secret of ``org`` (422 on ``secret_ref`` otherwise).

    Another org's secret looks exactly like a missing one.
    """
    if not secret_ref:  # None (an explicit null in an edit) or empty
        raise ValidationFailedError.single("secret_ref", "must be the id of a secret of this org")
    found = session.scalar(
        select(Secret.id).where(
            Secret.org_id == org.id, Secret.id == secret_ref, Secret.kind == MANAGED, Secret.ciphertext.is_not(None)
        )
    )
    if found is None:
        raise ValidationFailedError.single("secret_ref", "no secret with this id in this org")
    return secret_ref


# Mutations (org admin) ---------------------------------------------------------------------


def _check_name_free(session: Session, org: Org, name: str, exclude_id: str | None = None) -> None:
    stmt = select(Secret.id).where(Secret.org_id == org.id, Secret.name == name)
    if exclude_id:
        stmt = stmt.where(Secret.id != exclude_id)
    if session.scalar(stmt):
        raise ConflictError(f"a secret named {name!r} already exists in this org")


def _flush_unique(session: Session, name: str) -> None:
    flush_or_raise(session, ConflictError(f"a secret named {name!r} already exists in this org"))


def create_secret(
    session: Session, ctx: RequestContext, access: OrgAccess, keys: PublicKeySet, data: SecretCreate
) -> SecretOut:
    """Seal a new secret at version 1 (org admin)."""
    access.require_admin()
    org = access.org
    hosts = data.allowed_hosts or []
    _check_name_free(session, org, data.name)
    secret_id = new_id()
    sealed = seal(keys, data.value.encode("utf-8"), secret_context(org.id, secret_id, 1))
    now = utcnow()
    secret = Secret(
        id=secret_id,
        org_id=org.id,
        name=data.name,
        description=data.description,
        ciphertext=sealed.ciphertext,
        key_id=sealed.key_id,
        version=1,
        value_hint=value_hint(data.value),
        allowed_hosts=hosts,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(secret)
    _flush_unique(session, data.name)
    audit.record(
        session,
        ctx,
        "secret.create",
        org_id=org.id,
        target_type="secret",
        target_id=secret.id,
        details={"name": data.name, "version": 1, "key_id": sealed.key_id, "allowed_hosts": hosts},
    )
    return SecretOut.of(secret, used_by=[])


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
    access: OrgAccess,
    keys: PublicKeySet,
    secret_id: str,
    data: SecretUpdate,
    *,
    if_match: int | None = None,
) -> SecretOut:
    """Apply a partial edit (org admin); a new value re-seals under version + 1, atomically."""
    access.require_admin()
    org = access.org
    # The row lock serialises concurrent edits (PostgreSQL); SQLite serialises writers anyway.
    secret = _row(session, org, secret_id, for_update=True)
    if if_match is not None and if_match != secret.version:
        raise VersionMismatchError(f"the secret is at version {secret.version}", current_version=secret.version)

    edits = data.model_dump(exclude_unset=True, exclude={"value"})
    if "allowed_hosts" in edits:
        edits["allowed_hosts"] = edits["allowed_hosts"] or []  # null: any host, stored as []
    current = {"name": secret.name, "description": secret.description, "allowed_hosts": secret.allowed_hosts or []}
    changed = [field for field, value in edits.items() if value != current[field]]
    if "name" in changed:
        _check_name_free(session, org, edits["name"], exclude_id=secret.id)
    for field in changed:
        setattr(secret, field, edits[field])
    previous_version = secret.version
    now = utcnow()
    if data.value is not None:
        # The web tier cannot open the stored value to compare it, and storing a
        # comparable digest would give an offline guessing oracle: a supplied value
        # is a new value, and always a new version.
        version = secret.version + 1
        sealed = seal(keys, data.value.encode("utf-8"), secret_context(org.id, secret.id, version))
        secret.version = version
        secret.ciphertext = sealed.ciphertext
        secret.key_id = sealed.key_id
        secret.value_hint = value_hint(data.value)
        secret.rotated_at = now
        changed.append("value")
    if not changed:
        return _out(session, secret)
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
    return _out(session, secret)


def delete_secret(session: Session, ctx: RequestContext, access: OrgAccess, secret_id: str) -> None:
    """Delete a secret that nothing references any more (org admin)."""
    access.require_admin()
    org = access.org
    secret = _row(session, org, secret_id, for_update=True)
    users = _users(session, org.id, [secret.id]).get(secret.id, [])
    if users:
        raise SecretInUseError(
            f"secret is used by {len(users)} resource(s); unbind it first", used_by=[u.model_dump() for u in users]
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
