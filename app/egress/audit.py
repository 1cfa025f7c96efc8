"""Audit events for the worker's egress decisions, shared by every job that sends a credential.

* ``egress.denied``: the guard refused a destination (a private address, a host outside the
  secret's ``allowed_hosts``, a redirect); names the host and the code, never the secret.
* ``egress.stale``: a job's recorded destination no longer matches the rows (an admin unbound
  or re-pointed something after the job was queued); the job ends ``stale`` before any secret
  is resolved, and the event names which fields changed.
"""

from __future__ import annotations

from typing import Any

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.db import Database
from app.egress.guard import EgressError
from app.errors import WorkerError

WORKER = RequestContext(Actor("worker"))


class StaleDestinationError(WorkerError):
    """The destination bound to a job changed after it was queued; nothing was sent."""

    code = "stale"

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)


def denied(
    db: Database, job_id: str, exc: EgressError, *, org_id: str, target_type: str, target_id: str, **extra: Any
) -> None:
    """Record that the egress guard refused ``exc.host`` for this job."""
    with db.session() as s:
        audit.record(
            s,
            WORKER,
            "egress.denied",
            org_id=org_id,
            target_type=target_type,
            target_id=target_id,
            details={"code": exc.code, "host": exc.host, "job_id": job_id, **extra},
        )


def changed_fields(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """The (dotted) keys where two destination snapshots differ."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(recorded) | set(current), key=str):
            out += changed_fields(recorded.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if recorded == current else [prefix.rstrip(".") or "destination"]


def stale(
    db: Database,
    job_id: str,
    kind: str,
    changed: list[str],
    *,
    org_id: str,
    target_type: str,
    target_id: str,
    what: str,
) -> StaleDestinationError:
    """Audit a stale destination; returns the ``stale`` failure for the caller to raise.

    Called before any secret is resolved: a job sends a credential only to the destination that
    was bound to it when the job was queued *and* still is when it runs.
    """
    with db.session() as s:
        audit.record(
            s,
            WORKER,
            "egress.stale",
            org_id=org_id,
            target_type=target_type,
            target_id=target_id,
            details={"code": StaleDestinationError.code, "job_id": job_id, "kind": kind, "changed": changed},
        )
    return StaleDestinationError(
        f"{what} changed after this job was queued ({', '.join(changed)}); nothing was sent: queue it again"
    )
