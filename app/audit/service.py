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
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.context import RequestContext
from app.db import utcnow
from app.models import AuditEvent, AuditHead

INSTANCE_CHAIN = "instance"
GENESIS = "0" * 64


def _canonical(event: AuditEvent) -> bytes:
    at: datetime = event.at
    body = {
        "chain": event.chain,
        "seq": event.seq,
        "org_id": event.org_id,
        "at": at.isoformat(timespec="microseconds"),
        "actor": [event.actor_type, event.actor_id],
        "action": event.action,
        "target": [event.target_type, event.target_id],
        "request_id": event.request_id,
        "ip": event.ip,
        "details": event.details,
        "prev": event.prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_hash(event: AuditEvent) -> str:
    return hashlib.sha256(_canonical(event)).hexdigest()


def _lock_head(session: Session, chain: str) -> AuditHead:
    dialect = session.get_bind().dialect.name
    table = AuditHead.__table__
    assert isinstance(table, Table)
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table).values(chain=chain, seq=0, hash=GENESIS).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(table).values(chain=chain, seq=0, hash=GENESIS).on_conflict_do_nothing()
    session.execute(stmt)
    head = session.scalars(
        select(AuditHead).where(AuditHead.chain == chain).with_for_update().execution_options(populate_existing=True)
    ).one()
    return head


def record(
    session: Session,
    ctx: RequestContext,
    action: str,
    *,
    org_id: str | None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the org's chain (or the instance chain); never carries a value."""
    chain = org_id or INSTANCE_CHAIN
    head = _lock_head(session, chain)
    event = AuditEvent(
        chain=chain,
        seq=head.seq + 1,
        org_id=org_id,
        at=utcnow(),
        actor_type=ctx.actor.type,
        actor_id=ctx.actor.id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        request_id=ctx.request_id,
        ip=ctx.ip,
        details=details or {},
        prev_hash=head.hash,
    )
    event.hash = compute_hash(event)
    head.seq, head.hash = event.seq, event.hash
    session.add(event)
    session.flush()
    return event


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
