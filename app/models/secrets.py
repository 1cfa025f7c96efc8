"""Managed secrets: sealed ciphertext bound to (org, id, version), never plaintext."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, new_id


class Secret(Base):
    __tablename__ = "secrets"
    __table_args__ = (
        UniqueConstraint("org_id", "name"),
        # The target of every composite foreign key (org_id, secret_ref): a reference
        # can only point at a secret of its own org.
        UniqueConstraint("org_id", "id"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id"))
    name: Mapped[str] = mapped_column(String(128))
    # "managed": an org's own secret (the secrets API and UI); "connection": the tokens of an MCP
    # connection (app/models/connections.py), never listed, revealed, edited or bound by anyone.
    kind: Mapped[str] = mapped_column(String(16), default="managed", server_default="managed")
    description: Mapped[str | None] = mapped_column(String(1000))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Bumped on every committed change (value, hosts, name...): the cache pointer's order,
    # a database counter rather than a web host's clock.
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    value_hint: Mapped[str | None] = mapped_column(String(8))
    allowed_hosts: Mapped[list[str] | None] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(String(64))
    updated_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The legacy plaintext column (revision 0001) is not mapped: only app/backfill/legacy.py
    # reads it, until the contract migration (0006) drops it.


class CacheInvalidation(Base):
    """Outbox: a committed change whose cache invalidation has not reached Redis yet.

    Written in the same transaction as the change, applied right after the commit, and
    replayed by beat when Redis could not take it, so no invalidation is ever lost.
    """

    __tablename__ = "cache_invalidations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(36))
    secret_id: Mapped[str] = mapped_column(String(36))
    # "<version>:<revision>" of the committed row, or "deleted".
    pointer: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now(), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
