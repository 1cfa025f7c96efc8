"""The verify job: proves the backfill before the contract migration may drop anything.

Runs in a worker (only workers hold the private keyring). Read-only over customer data:

1. **secrets**: every legacy secret is sealed, opens under its own (org, id, version)
   context, and at version 1 holds exactly the legacy plaintext (constant-time compare). A
   secret edited since the backfill (version > 1) legitimately holds a newer value: it is
   counted as ``edited``, not compared.
2. **mcp_servers**: every server that had a raw token references a secret of its own org
   that opens to exactly that token (or was edited since, as above).
3. **agents**: every legacy agent points at a provider of its own org, of the legacy kind,
   whose secret opens to the agent's legacy provider key.
4. **the cache**: on this deployment's real database, Redis and workers, a temporary probe
   secret is resolved (cached), edited (version bump, invalidation acknowledged), and
   resolved again; the new value must come back, from L1 and from L2, never the old one.
   The probe is deleted afterwards. Customer secrets are never edited: a version bump on
   them would show in their history and hide the very value being verified.

It stores a :class:`~app.models.BackfillVerification` (counts, failures, unmigrated rows,
the number of legacy rows checked, times), which ``latchkey backfill status``, the operator
API and the contract migration read. No value ever appears in it.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.backfill import legacy
from app.backfill.service import parse_model
from app.context import RequestContext
from app.db import Database, utcnow
from app.models import BackfillVerification, Job, Org, Provider, Secret
from app.secrets.keyring import Keyring
from app.secrets.sealing import SealingError, open_sealed, secret_context

log = logging.getLogger("latchkey.backfill")

DEFAULT_BATCH_SIZE = 1000
MAX_FAILURES_LISTED = 100
KINDS = ("secrets", "mcp_servers", "agents")

# (org_id) -> the cache check's result; see app/secrets/cache_probe.py.
CacheCheck = Callable[[str], dict[str, Any]]
Progress = Callable[[int], None]


@dataclass
class KindCounts:
    checked: int = 0
    matched: int = 0
    edited: int = 0  # changed on purpose since the backfill (a newer secret version)
    failed: int = 0
    unmigrated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "matched": self.matched,
            "edited": self.edited,
            "failed": self.failed,
            "unmigrated": self.unmigrated,
        }


@dataclass
class Report:
    started_at: datetime
    counts: dict[str, KindCounts] = field(default_factory=lambda: {k: KindCounts() for k in KINDS})
    failures: list[dict[str, str]] = field(default_factory=list)
    legacy_rows: dict[str, int] = field(default_factory=dict)
    cache_check: dict[str, Any] = field(default_factory=dict)
    contracted: bool = False

    def fail(self, kind: str, row_id: str, org_id: str, reason: str) -> None:
        self.counts[kind].failed += 1
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append({"kind": kind, "id": row_id, "org_id": org_id, "reason": reason})
        log.warning("backfill verify: %s %s of org %s: %s", kind, row_id, org_id, reason)

    def part(self) -> dict[str, Any]:
        """What a part found (counts and failures), as a part's job result."""
        return {"counts": {k: c.as_dict() for k, c in self.counts.items()}, "failures": list(self.failures)}

    def add(self, part: dict[str, Any]) -> None:
        """Add a part's counts and failures (at most MAX_FAILURES_LISTED failures kept)."""
        for kind, counts in part["counts"].items():
            mine = self.counts[kind]
            for name, n in counts.items():
                setattr(mine, name, getattr(mine, name) + n)
        self.failures += part["failures"][: MAX_FAILURES_LISTED - len(self.failures)]

    @property
    def unmigrated(self) -> int:
        return sum(c.unmigrated for c in self.counts.values())

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.counts.values())

    @property
    def passed(self) -> bool:
        cache_ok = bool(self.cache_check.get("ok")) or self.cache_check.get("skipped") is not None
        return self.failed == 0 and self.unmigrated == 0 and cache_ok


def _compare(
    report: Report, kind: str, row_id: str, org_id: str, expected: str, version: int, opened: bytes | str
) -> None:
    counts = report.counts[kind]
    if isinstance(opened, str):
        report.fail(kind, row_id, org_id, opened)
    elif version > 1:
        counts.edited += 1
    elif hmac.compare_digest(opened, expected.encode("utf-8")):
        counts.matched += 1
    else:
        report.fail(kind, row_id, org_id, "value_mismatch: the sealed value differs from the legacy value")


class _Verify:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        report: Report,
        batch_size: int,
        orgs: list[str],
        progress: Progress | None,
    ) -> None:
        self.db, self.keyring, self.report = db, keyring, report
        self.batch_size, self.orgs, self.progress = batch_size, orgs, progress

    def batches(self, stmt: Any, id_column: Any) -> Any:
        """Keyset pagination over ``stmt`` (this part's orgs); one short read-only transaction per batch."""
        last: str | None = None
        stmt = stmt.where(id_column.table.c.org_id.in_(self.orgs))
        while True:
            page = stmt if last is None else stmt.where(id_column > last)
            with self.db.session() as s:
                rows = list(s.execute(page.order_by(id_column).limit(self.batch_size)))
            if not rows:
                return
            last = rows[-1][0]
            yield rows
            if self.progress is not None:
                self.progress(sum(c.checked for c in self.report.counts.values()))

    def secrets(self) -> None:
        t = legacy.secrets
        counts = self.report.counts["secrets"]
        stmt = select(t.c.id, t.c.org_id, t.c.value, t.c.version, t.c.ciphertext).where(t.c.value.is_not(None))
        for rows in self.batches(stmt, t.c.id):
            for sid, org_id, value, version, ciphertext in rows:
                counts.checked += 1
                if ciphertext is None:
                    counts.unmigrated += 1
                    continue
                _compare(
                    self.report, "secrets", sid, org_id, value, version, self._open(org_id, sid, version, ciphertext)
                )

    def _open(self, org_id: str, secret_id: str, version: int, ciphertext: bytes) -> bytes | str:
        """The plaintext, or why it does not open (never the value)."""
        try:
            return open_sealed(self.keyring, bytes(ciphertext), secret_context(org_id, secret_id, version))
        except SealingError as exc:
            return f"does_not_open: {type(exc).__name__}"

    def mcp_servers(self) -> None:
        m = legacy.mcp_servers
        counts = self.report.counts["mcp_servers"]
        stmt = (
            select(m.c.id, m.c.org_id, m.c.token, m.c.secret_ref, Secret.org_id, Secret.version, Secret.ciphertext)
            .outerjoin(Secret, Secret.id == m.c.secret_ref)
            .where(m.c.token.is_not(None))
        )
        for rows in self.batches(stmt, m.c.id):
            for mid, org_id, token, ref, secret_org, version, ciphertext in rows:
                counts.checked += 1
                if ref is None:
                    counts.unmigrated += 1
                elif secret_org != org_id:
                    self.report.fail(
                        "mcp_servers", mid, org_id, "secret_not_found: secret_ref is not a secret of this org"
                    )
                elif ciphertext is None:
                    self.report.fail(
                        "mcp_servers", mid, org_id, "secret_not_sealed: the referenced secret is not sealed"
                    )
                else:
                    opened = self._open(org_id, ref, version, ciphertext)
                    _compare(self.report, "mcp_servers", mid, org_id, token, version, opened)

    def agents(self) -> None:
        a, ls = legacy.agents, legacy.secrets
        counts = self.report.counts["agents"]
        stmt = (
            select(
                a.c.id,
                a.c.org_id,
                a.c.model,
                a.c.secret_ref,
                a.c.provider_id,
                Provider.org_id,
                Provider.kind,
                Provider.secret_ref,
            )
            .outerjoin(Provider, Provider.id == a.c.provider_id)
            .where(a.c.model.is_not(None) & a.c.secret_ref.is_not(None))
        )
        for rows in self.batches(stmt, a.c.id):
            for aid, org_id, model, legacy_ref, provider_id, p_org, p_kind, p_ref in rows:
                counts.checked += 1
                if provider_id is None:
                    counts.unmigrated += 1
                    continue
                parsed = parse_model(model)
                if p_org != org_id:
                    self.report.fail(
                        "agents", aid, org_id, "provider_not_found: provider_id is not a provider of this org"
                    )
                elif parsed is not None and parsed[0] != p_kind:
                    self.report.fail("agents", aid, org_id, f"kind_mismatch: the provider's kind is not {parsed[0]!r}")
                elif p_ref == legacy_ref:
                    counts.matched += 1  # the very secret verified in step 1
                else:
                    self._same_credential(aid, org_id, legacy_ref, p_ref, ls)

    def _same_credential(self, agent_id: str, org_id: str, legacy_ref: str, provider_ref: str, ls: Any) -> None:
        """A provider made by hand (e.g. for an unsupported kind): its key must be the legacy one."""
        with self.db.session() as s:
            expected = s.scalar(select(ls.c.value).where(ls.c.org_id == org_id, ls.c.id == legacy_ref))
            row = s.execute(
                select(Secret.version, Secret.ciphertext).where(Secret.org_id == org_id, Secret.id == provider_ref)
            ).first()
        if expected is None or row is None:
            self.report.fail(
                "agents", agent_id, org_id, "secret_not_found: the legacy or the provider's secret is gone"
            )
            return
        version, ciphertext = row
        opened = self._open(org_id, provider_ref, version, ciphertext)
        _compare(self.report, "agents", agent_id, org_id, expected, version, opened)


def _probe_org(session: Session) -> str | None:
    """Where the cache check runs: an org holding backfilled secrets, else any org."""
    backfilled = (
        session.scalar(select(legacy.secrets.c.org_id).where(legacy.secrets.c.value.is_not(None)).limit(1))
        if legacy.present(session)
        else None
    )
    return backfilled or session.scalar(select(Org.id).order_by(Org.id).limit(1))


def verify_part(
    db: Database,
    keyring: Keyring,
    orgs: list[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the legacy rows of ``orgs`` (steps 1-3 of the module doc): their counts and failures.

    ``progress(checked)`` after each batch."""
    report = Report(started_at=utcnow())
    with db.session() as s:
        if not legacy.present(s, refresh=True):
            return report.part()
    run = _Verify(db, keyring, report, batch_size, orgs, progress)
    run.secrets()
    run.mcp_servers()
    run.agents()
    return report.part()


def record_verification(
    db: Database,
    ctx: RequestContext,
    parts: list[dict[str, Any]],
    *,
    cache_check: CacheCheck,
    job_id: str | None = None,
) -> BackfillVerification:
    """Add up the parts' checks, run the cache check (step 4) and store the verification record."""
    report = Report(started_at=utcnow())
    with db.session() as s:
        if job_id is not None:
            report.started_at = s.scalar(select(Job.started_at).where(Job.id == job_id)) or report.started_at
        report.contracted = not legacy.present(s, refresh=True)
        report.legacy_rows = legacy.legacy_counts(s)
        probe_org = _probe_org(s)
    for part in parts:
        report.add(part)
    if probe_org is None:
        report.cache_check = {"skipped": "no org exists to run the check in"}
    else:
        report.cache_check = cache_check(probe_org)
    record = BackfillVerification(
        job_id=job_id,
        passed=report.passed,
        unmigrated=report.unmigrated,
        legacy_rows=report.legacy_rows,
        counts={k: c.as_dict() for k, c in report.counts.items()},
        failures=report.failures,
        cache_check=report.cache_check,
        started_at=report.started_at,
        finished_at=utcnow(),
    )
    with db.session() as s:
        s.add(record)
        s.flush()
        audit.record(
            s,
            ctx,
            "backfill.verify",
            org_id=None,
            target_type="backfill_verification",
            target_id=record.id,
            details={"passed": record.passed, "unmigrated": record.unmigrated, "failed": report.failed},
        )
        s.expunge(record)
    log.info(
        "backfill verify %s: %d row(s) checked, %d failed, %d unmigrated, cache check %s",
        "passed" if record.passed else "FAILED",
        sum(c.checked for c in report.counts.values()),
        report.failed,
        report.unmigrated,
        "ok" if report.cache_check.get("ok") else report.cache_check.get("skipped") or "failed",
    )
    return record


def as_dict(record: BackfillVerification) -> dict[str, Any]:
    """The record as the CLI, the API and the job result show it."""
    return {
        "id": record.id,
        "job_id": record.job_id,
        "passed": record.passed,
        "unmigrated": record.unmigrated,
        "legacy_rows": record.legacy_rows,
        "counts": record.counts,
        "failures": record.failures,
        "cache_check": record.cache_check,
        "started_at": record.started_at.isoformat(),
        "finished_at": record.finished_at.isoformat(),
    }


def latest(session: Session) -> BackfillVerification | None:
    return session.scalar(
        select(BackfillVerification)
        .order_by(BackfillVerification.finished_at.desc(), BackfillVerification.id.desc())
        .limit(1)
    )
