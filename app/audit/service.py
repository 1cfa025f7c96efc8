"""The audit log: append-only, one hash chain per org plus one for the instance.

Each event stores the hash of the previous event of its chain and its own hash over a
canonical encoding of every field, and the chain head (last seq and hash) lives in
``audit_heads``. Editing any row breaks its hash; deleting a row leaves a gap in ``seq``
or a head that no longer matches the last row. Appends lock the head row so two
concurrent transactions can never fork a chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.audit.schemas import AuditFilter
from app.context import RequestContext
from app.db import bulk_insert, bulk_update, new_id, utcnow
from app.models import AuditEvent, AuditHead
from app.pagination import Page, paginate

INSTANCE_CHAIN = "instance"
AUDIT_EVENTS = cast(Table, AuditEvent.__table__)
AUDIT_HEADS = cast(Table, AuditHead.__table__)
GENESIS = "0" * 64


# json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True), with the encoder built
# once: json.dumps builds a new one on every call with non-default options (a batch hashes thousands).
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _canonical(event: Mapping[str, Any]) -> bytes:
    at: datetime = event["at"]
    body = {
        "chain": event["chain"],
        "seq": event["seq"],
        "org_id": event["org_id"],
        "at": at.isoformat(timespec="microseconds"),
        "actor": [event["actor_type"], event["actor_id"]],
        "action": event["action"],
        "target": [event["target_type"], event["target_id"]],
        "request_id": event["request_id"],
        "ip": event["ip"],
        "details": event["details"],
        "prev": event["prev_hash"],
    }
    return _CANONICAL_JSON.encode(body).encode()


_HASHED = (
    *("chain", "seq", "org_id", "at", "actor_type", "actor_id", "action"),
    *("target_type", "target_id", "request_id", "ip", "details", "prev_hash"),
)


def compute_hash(event: AuditEvent | Mapping[str, Any]) -> str:
    fields = event if isinstance(event, Mapping) else {name: getattr(event, name) for name in _HASHED}
    return hashlib.sha256(_canonical(fields)).hexdigest()


def _upsert_heads(insert_fn: Any, values: Any) -> Any:
    # ON CONFLICT DO UPDATE (a no-op update) locks an existing head and RETURNING reads it: one
    # statement where "create if missing" + "SELECT ... FOR UPDATE" took two.
    stmt = insert_fn(AUDIT_HEADS).values(values)
    return stmt.on_conflict_do_update(
        index_elements=[AUDIT_HEADS.c.chain], set_={"chain": stmt.excluded.chain}
    ).returning(AUDIT_HEADS.c.chain, AUDIT_HEADS.c.seq, AUDIT_HEADS.c.hash)


# One chain, one event (an API request's): statements built once, bound parameters only.
# Parameter names are prefixed: a key named like an audit_heads column would become a SET clause.
_LOCK_ONE = {
    name: _upsert_heads(fn, {"chain": bindparam("b_chain"), "seq": 0, "hash": GENESIS})
    for name, fn in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
_APPEND_ONE = (
    update(AUDIT_HEADS)
    .where(AUDIT_HEADS.c.chain == bindparam("b_chain"))
    .values(seq=bindparam("b_seq"), hash=bindparam("b_hash"))
    # PostgreSQL runs a data-modifying WITH even though the UPDATE does not read it: the event
    # and the head that points at it are written by one statement (one round trip).
    .add_cte(
        insert(AUDIT_EVENTS)
        .values({c.name: bindparam(f"e_{c.name}", type_=c.type) for c in AUDIT_EVENTS.c})
        .cte("appended")
    )
)


def _lock_heads(session: Session, chains: list[str]) -> dict[str, tuple[int, str]]:
    """Create missing heads and lock every head of ``chains`` (in chain order: no deadlock).

    One statement whatever the number of chains: a batch job appending to a hundred orgs'
    chains locks them all at once. The rows are inserted, hence locked, in the order given.
    """
    dialect = session.get_bind().dialect.name
    if len(chains) == 1:
        stmt, params = _LOCK_ONE[dialect], {"b_chain": chains[0]}
    else:
        insert_fn: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt, params = _upsert_heads(insert_fn, [{"chain": c, "seq": 0, "hash": GENESIS} for c in chains]), {}
    return {chain: (seq, digest) for chain, seq, digest in session.execute(stmt, params)}


def _append(session: Session, rows: list[dict[str, Any]], moved: list[dict[str, Any]]) -> None:
    """Insert the events and move the heads to them."""
    if len(rows) == 1 and session.get_bind().dialect.name == "postgresql":
        (head,) = moved
        params = {f"e_{k}": v for k, v in rows[0].items()}
        session.execute(_APPEND_ONE, {"b_chain": head["chain"], "b_seq": head["seq"], "b_hash": head["hash"], **params})
        return
    bulk_insert(session, AUDIT_EVENTS, rows)
    bulk_update(session, AUDIT_HEADS, moved, key="chain")


@dataclass(frozen=True)
class Entry:
    """One event to append (see :func:`record_many`)."""

    action: str
    org_id: str | None
    target_type: str | None = None
    target_id: str | None = None
    details: dict[str, Any] | None = None


def record(
    session: Session,
    ctx: RequestContext,
    action: str,
    *,
    org_id: str | None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one event to the org's chain (or the instance chain); never carries a value."""
    record_many(session, ctx, [Entry(action, org_id, target_type, target_id, details)])


def record_many(session: Session, ctx: RequestContext, entries: Sequence[Entry]) -> int:
    """Append events in order, locking each chain's head once (bulk jobs write thousands).

    Heads are locked in chain-name order, so two batches touching the same orgs cannot
    deadlock. Returns how many events were written.
    """
    by_chain: dict[str, list[Entry]] = {}
    for entry in entries:
        by_chain.setdefault(entry.org_id or INSTANCE_CHAIN, []).append(entry)
    if not by_chain:
        return 0
    # Pending ORM changes first, so the lock and the events follow them in this transaction.
    session.flush()
    heads = _lock_heads(session, sorted(by_chain))
    rows: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    for chain in sorted(by_chain):
        seq, prev = heads[chain]
        for entry in by_chain[chain]:
            seq += 1
            row: dict[str, Any] = {
                "id": new_id(),
                "chain": chain,
                "seq": seq,
                "org_id": entry.org_id,
                "at": utcnow(),
                "actor_type": ctx.actor.type,
                "actor_id": ctx.actor.id,
                "action": entry.action,
                "target_type": entry.target_type,
                "target_id": entry.target_id,
                "request_id": ctx.request_id,
                "ip": ctx.ip,
                "details": entry.details or {},
                "prev_hash": prev,
            }
            row["hash"] = prev = compute_hash(row)
            rows.append(row)
        moved.append({"chain": chain, "seq": seq, "hash": prev})
    _append(session, rows, moved)
    return len(rows)


@dataclass
class ChainReport:
    chain: str
    events: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(session: Session, chain: str, batch: int = 1000) -> ChainReport:
    """Walk one chain in order; report every edited, missing or reordered event."""
    report = ChainReport(chain)
    prev_hash, expected_seq = GENESIS, 1
    last_seq = 0
    while True:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.chain == chain, AuditEvent.seq > last_seq)
            .order_by(AuditEvent.seq)
            .limit(batch)
        ).all()
        if not rows:
            break
        for ev in rows:
            if ev.seq != expected_seq:
                report.problems.append(f"seq {expected_seq}..{ev.seq - 1} missing (deleted events)")
            if ev.prev_hash != prev_hash:
                report.problems.append(f"seq {ev.seq}: does not link to the previous event")
            if compute_hash(ev) != ev.hash:
                report.problems.append(f"seq {ev.seq}: contents do not match its hash (edited event)")
            prev_hash, expected_seq, last_seq = ev.hash, ev.seq + 1, ev.seq
            report.events += 1
        session.expunge_all()
    head = session.get(AuditHead, chain)
    if head is not None and (head.seq != last_seq or head.hash != prev_hash):
        report.problems.append(f"head is at seq {head.seq} but the last event is seq {last_seq} (events removed)")
    return report


def chains(session: Session) -> list[str]:
    """Every chain that has a head or an event."""
    names = set(session.scalars(select(AuditHead.chain)).all())
    names.update(session.scalars(select(AuditEvent.chain).distinct()).all())
    return sorted(names)


def list_events(
    session: Session, access: OrgAccess, where: AuditFilter, *, limit: int, cursor: str | None
) -> Page[AuditEvent]:
    """The org's audit events matching ``where``, newest first (org admin)."""
    access.require_admin()
    stmt = select(AuditEvent).where(AuditEvent.chain == access.org.id)
    if where.action:
        stmt = stmt.where(AuditEvent.action == where.action)
    if where.target_type:
        stmt = stmt.where(AuditEvent.target_type == where.target_type)
    if where.target_id:
        stmt = stmt.where(AuditEvent.target_id == where.target_id)
    if where.since:
        stmt = stmt.where(AuditEvent.at >= where.since)  # UtcDateTime: aware, in UTC
    return paginate(session, stmt, AuditEvent.seq, limit=limit, cursor=cursor, descending=True)
