"""The backfill job: legacy rows (revision 0001) become managed secrets and providers.

Three steps, in this order (a provider must point at a sealed secret):

1. **secrets**: a legacy secret (``value`` set, ``ciphertext`` empty) is sealed at version 1
   with the context (org, id, 1) and named ``legacy_<first 8 of id>`` (a suffix when the
   name is taken). The legacy ``value`` is KEPT: verify compares against it and the contract
   migration drops the column.
2. **mcp_servers**: a server with a legacy ``token`` and no ``secret_ref`` gets a new sealed
   secret ``mcp_<slugified name>_<first 6 of server id>``; servers of one org with the same
   token share one secret, found by comparing plaintexts in memory during this run only (no
   digest of a token is ever stored). Across runs each server gets its own secret.
3. **agents**: an agent with a legacy ``model`` (``{kind}/{model_id}``) and ``secret_ref``
   and no ``provider_id`` gets the provider for (org, legacy secret, kind), looked up first
   and created only when missing (``legacy <kind> <first 6 of secret id>``). Kind ``openai``
   maps to provider type ``openai`` and ``anthropic`` to ``anthropic``; any other kind has no
   faithful mapping (``openai_compatible`` needs a base URL the legacy data does not have), so
   the agent fails with ``unsupported_kind`` and is left for the operator.

Each step walks its table by primary key (keyset pagination), one transaction per batch,
and each row in a savepoint: a row is migrated completely (secret created AND reference set)
or not at all, so a run killed at any point and rerun never creates duplicates. Pending rows
are selected ``FOR UPDATE`` (PostgreSQL re-checks the filter after waiting on a lock), so two
concurrent runs do not migrate one row twice. A dry run selects and names everything the same
way but writes nothing (no audit events either; each batch is rolled back to be sure).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import String, Table, any_, bindparam, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.audit.service import Entry as AuditEntry
from app.backfill import legacy
from app.context import RequestContext
from app.db import BatchCheckpoint, Database, bulk_insert, bulk_update, new_id, utcnow
from app.errors import NotFoundError
from app.models import Agent, McpServer, Org, Provider, Secret
from app.providers.catalog import KIND_RE
from app.secrets.catalog import NAME_RE, value_hint
from app.secrets.keyring import PublicKeySet
from app.secrets.sealing import seal, secret_context

log = logging.getLogger("latchkey.backfill")

DEFAULT_BATCH_SIZE = 200
MAX_BATCH_SIZE = 5000
MAX_FAILURES_LISTED = 100
# Legacy kind -> provider type. Other kinds have no faithful mapping (see the module doc).
PROVIDER_TYPE_FOR_KIND = {"openai": "openai", "anthropic": "anthropic"}

Progress = Callable[[int, int], None]
SECRETS, PROVIDERS = cast(Table, Secret.__table__), cast(Table, Provider.__table__)
MCP_SERVERS, AGENTS = cast(Table, McpServer.__table__), cast(Table, Agent.__table__)


@dataclass
class KindSummary:
    pending: int = 0  # rows to migrate when the run started
    migrated: int = 0
    skipped: int = 0  # already migrated before this run
    failed: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def fail(self, row_id: str, org_id: str, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_LISTED:
            self.failures.append({"id": row_id, "org_id": org_id, "reason": reason})
        log.warning("backfill: row %s of org %s not migrated: %s", row_id, org_id, reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrated": self.migrated,
            "skipped": self.skipped,
            "failed": self.failed,
            "failures": list(self.failures),
        }

    def state(self) -> dict[str, Any]:
        return {**self.as_dict(), "pending": self.pending}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> KindSummary:
        return cls(state["pending"], state["migrated"], state["skipped"], state["failed"], list(state["failures"]))

    def merge(self, other: KindSummary) -> None:
        self.pending += other.pending
        self.migrated += other.migrated
        self.skipped += other.skipped
        self.failed += other.failed
        self.failures += other.failures[: MAX_FAILURES_LISTED - len(self.failures)]


@dataclass
class Summary:
    dry_run: bool
    batch_size: int
    org: str | None = None
    secrets: KindSummary = field(default_factory=KindSummary)
    mcp_servers: KindSummary = field(default_factory=KindSummary)
    agents: KindSummary = field(default_factory=KindSummary)
    secrets_created: int = 0  # new secrets holding MCP tokens
    providers_created: int = 0
    # step -> the last id walked (a part taken again carries on after it: a row left failed
    # is counted once). Kept in a part's checkpoint, not shown in the result.
    cursor: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.secrets.pending + self.mcp_servers.pending + self.agents.pending

    @property
    def done(self) -> int:
        return sum(k.migrated + k.failed for k in (self.secrets, self.mcp_servers, self.agents))

    @property
    def failed(self) -> int:
        return self.secrets.failed + self.mcp_servers.failed + self.agents.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "batch_size": self.batch_size,
            "org": self.org,
            "secrets": self.secrets.as_dict(),
            "mcp_servers": self.mcp_servers.as_dict(),
            "agents": self.agents.as_dict(),
            "created": {"secrets": self.secrets_created, "providers": self.providers_created},
        }

    def state(self) -> dict[str, Any]:
        """Everything a part's next attempt starts from (a part's checkpoint, see app/tasks/split.py)."""
        return {
            **self.as_dict(),
            **{name: getattr(self, name).state() for name in STEPS},
            "cursor": dict(self.cursor),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Summary:
        summary = cls(dry_run=state["dry_run"], batch_size=state["batch_size"], org=state["org"])
        for name in STEPS:
            setattr(summary, name, KindSummary.restore(state[name]))
        summary.secrets_created = state["created"]["secrets"]
        summary.providers_created = state["created"]["providers"]
        summary.cursor = dict(state.get("cursor", {}))
        return summary

    def merge(self, other: Summary) -> None:
        """Add a part's summary to the whole run's."""
        for name in STEPS:
            getattr(self, name).merge(getattr(other, name))
        self.secrets_created += other.secrets_created
        self.providers_created += other.providers_created


STEPS = ("secrets", "mcp_servers", "agents")


# Names ----------------------------------------------------------------------------------------


def slugify(text: str, max_len: int = 80) -> str:
    """ASCII, lowercase, runs of anything else as one ``_``; ``server`` when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:max_len].strip("_")
    return slug or "server"


class Namer:
    """Hands out names unique per org: ``base``, then ``base<sep>2``, ``base<sep>3``...

    A whole batch is named with one query per round (usually one round), and every name
    handed out in this run is remembered, so a dry run (which writes nothing) and a batch
    retried row by row never hand out one name twice.
    """

    def __init__(self, model: Any, sep: str, max_len: int) -> None:
        self.model, self.sep, self.max_len = model, sep, max_len
        self.taken: set[tuple[str, str]] = set()
        # PostgreSQL: the candidates go as two array parameters of one statement built once; an
        # IN list of a thousand names cost more to compile than to run. SQLite: IN lists.
        self._taken_pg = select(model.org_id, model.name).where(
            model.org_id == any_(bindparam("b_orgs", type_=ARRAY(String()))),
            model.name == any_(bindparam("b_names", type_=ARRAY(String()))),
        )

    def _in_db(self, session: Session, orgs: set[str], names: set[str]) -> set[tuple[str, str]]:
        """Which of the (org, name) pairs of ``orgs`` x ``names`` the table holds."""
        if session.get_bind().dialect.name == "postgresql":
            rows = session.execute(self._taken_pg, {"b_orgs": list(orgs), "b_names": list(names)})
        else:
            m = self.model
            rows = session.execute(select(m.org_id, m.name).where(m.org_id.in_(orgs), m.name.in_(names)))
        return {(org, name) for org, name in rows}

    def _candidate(self, base: str, n: int) -> str:
        if n == 1:
            return base[: self.max_len]
        suffix = f"{self.sep}{n}"
        return base[: self.max_len - len(suffix)] + suffix

    def assign(self, session: Session, wants: list[tuple[str, str]]) -> list[str]:
        """One free name per (org_id, base), in order.

        Rows wanting one base (ids sharing their first characters: a UUIDv7's are its
        timestamp) are offered ``base``, ``base<sep>2``... together in one round, so a round
        costs one query however many rows share a base; only names found taken in the
        database send their rows to another round. Within a base, names go out in row order.
        """
        out: list[str] = [""] * len(wants)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, want in enumerate(wants):
            groups.setdefault(want, []).append(i)
        tried = dict.fromkeys(groups, 0)  # (org, base) -> the highest suffix offered so far
        while groups:
            offered: dict[tuple[str, str], list[str]] = {}
            for (org, base), rows in groups.items():
                names: list[str] = []
                n = tried[org, base]
                while len(names) < len(rows):
                    n += 1
                    name = self._candidate(base, n)
                    if (org, name) not in self.taken:
                        names.append(name)
                tried[org, base] = n
                offered[org, base] = names
            in_db = self._in_db(
                session, {org for org, _ in offered}, {name for names in offered.values() for name in names}
            )
            left: dict[tuple[str, str], list[int]] = {}
            for (org, base), names in offered.items():
                rows = groups[org, base]
                # Another base's row may have been given one of these names just now (a base
                # that is a suffixed or truncated form of this one).
                free = [name for name in names if (org, name) not in in_db and (org, name) not in self.taken]
                for i, name in zip(rows, free, strict=False):
                    self.taken.add((org, name))
                    out[i] = name
                if len(free) < len(rows):
                    left[org, base] = rows[len(free) :]
            groups = left
        return out


def parse_model(model: str) -> tuple[str, str] | None:
    """Legacy ``{kind}/{model_id}`` -> (kind, model_id); None when malformed."""
    kind, sep, model_id = model.partition("/")
    kind, model_id = kind.strip().lower(), model_id.strip()
    if not sep or not model_id or len(model_id) > 200 or not KIND_RE.fullmatch(kind):
        return None
    return kind, model_id


# The run ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What applying one batch (or one row of it) did; merged into the run once committed."""

    migrated: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (id, org_id, reason)
    created: int = 0
    # Map entries (token or provider key -> id) that later batches may reuse once committed.
    entries: dict[Any, str] = field(default_factory=dict)

    def merge(self, other: Outcome) -> None:
        self.migrated += other.migrated
        self.failures += other.failures
        self.created += other.created
        self.entries.update(other.entries)


Apply = Callable[[Session, list[Any], dict[Any, str]], Outcome]
CONFLICT = "conflict (a concurrent change); run the backfill again"


class _Run:
    def __init__(
        self,
        db: Database,
        keys: PublicKeySet,
        ctx: RequestContext,
        summary: Summary,
        orgs: list[str] | None,
        progress: Progress | None,
        checkpoint: BatchCheckpoint | None = None,
    ) -> None:
        self.db, self.keys, self.ctx, self.summary = db, keys, ctx, summary
        self.orgs, self.progress, self.checkpoint = orgs, progress, checkpoint
        self.dry_run = summary.dry_run
        # (org_id, token) -> secret id, for servers sharing a token; committed batches only.
        self.token_secrets: dict[Any, str] = {}
        # (org_id, legacy secret id, kind) -> (provider id); committed batches only.
        self.providers: dict[Any, str] = {}
        # Model id of each provider this run created or found (a dry run's are nowhere else).
        self.provider_models: dict[str, str | None] = {}
        self.secret_names = Namer(Secret, "_", 128)
        self.provider_names = Namer(Provider, " ", 200)
        # Legacy secrets a dry run would have sealed (agents may point at them).
        self.would_seal: set[str] = set()

    def audit(self, session: Session, entries: list[audit.Entry]) -> None:
        if not self.dry_run and entries:
            audit.record_many(session, self.ctx, entries)

    def walk(
        self,
        step: str,
        table: Any,
        columns: list[Any],
        condition: Any,
        apply: Apply,
        known: dict[Any, str],
    ) -> None:
        """Walk the pending rows by id, one transaction per batch; see the module doc.

        A batch is applied in bulk inside a savepoint; if that hits a constraint (a
        concurrent change), it is applied again row by row, each in its own savepoint,
        so only the conflicting rows fail. Map entries join ``known`` after the commit.
        """
        kind: KindSummary = getattr(self.summary, step)
        last: str | None = self.summary.cursor.get(step)
        while True:
            stmt = select(*columns).where(condition)
            if self.orgs is not None:
                stmt = stmt.where(table.c.org_id.in_(self.orgs))
            if last is not None:
                stmt = stmt.where(table.c.id > last)
            stmt = stmt.order_by(table.c.id).limit(self.summary.batch_size).with_for_update()
            with self.db.session() as s:
                rows = list(s.execute(stmt))
                if not rows:
                    return
                last = rows[-1].id
                self.summary.cursor[step] = last
                outcome = Outcome()
                try:
                    with s.begin_nested():
                        outcome = apply(s, rows, dict(known))
                except IntegrityError:
                    seen = dict(known)
                    outcome = Outcome()
                    for row in rows:
                        try:
                            with s.begin_nested():
                                one = apply(s, [row], seen)
                        except IntegrityError:
                            outcome.failures.append((row.id, row.org_id, CONFLICT))
                            continue
                        seen.update(one.entries)
                        outcome.merge(one)
                if self.dry_run:
                    s.rollback()
                known.update(outcome.entries)
                kind.migrated += outcome.migrated
                for row_id, org_id, reason in outcome.failures:
                    kind.fail(row_id, org_id, reason)
                if kind is self.summary.mcp_servers:
                    self.summary.secrets_created += outcome.created
                elif kind is self.summary.agents:
                    self.summary.providers_created += outcome.created
                if self.checkpoint is not None:  # in this batch's transaction (a dry run's: after its rollback)
                    state = None if self.dry_run else self.summary.state()
                    self.checkpoint(s, state, self.summary.done, self.summary.total)
            if self.progress is not None:
                self.progress(self.summary.done, max(self.summary.total, self.summary.done))

    def write(
        self,
        s: Session,
        new_table: Table,
        inserts: list[dict[str, Any]],
        linked_table: Table,
        updates: list[dict[str, Any]],
        entries: list[AuditEntry],
    ) -> None:
        """A batch's writes: new rows, the rows now pointing at them, the audit events."""
        if not self.dry_run:
            bulk_insert(s, new_table, inserts)
            bulk_update(s, linked_table, updates)
            self.audit(s, entries)

    def actor_fields(self, now: Any) -> dict[str, Any]:
        return {"updated_at": now, "updated_by": self.ctx.actor.id}

    # 1. legacy secrets -------------------------------------------------------------------------

    def secrets(self) -> None:
        t = legacy.secrets
        columns = [t.c.id, t.c.org_id, t.c.value, t.c.name]
        self.walk("secrets", t, columns, legacy.secret_pending(), self._seal_legacy, {})

    def _seal_legacy(self, s: Session, rows: list[Any], _known: dict[Any, str]) -> Outcome:
        unnamed = [r for r in rows if not (r.name and NAME_RE.fullmatch(r.name))]
        given = dict(
            zip(
                [r.id for r in unnamed],
                self.secret_names.assign(s, [(r.org_id, f"legacy_{r.id[:8]}") for r in unnamed]),
                strict=True,
            )
        )
        updates, entries = [], []
        now = utcnow()
        for r in rows:
            self.would_seal.add(r.id)
            if self.dry_run:
                continue
            name = given.get(r.id, r.name)
            sealed = seal(self.keys, r.value.encode("utf-8"), secret_context(r.org_id, r.id, 1))
            updates.append(
                {
                    "id": r.id,
                    "name": name,
                    "version": 1,
                    "ciphertext": sealed.ciphertext,
                    "key_id": sealed.key_id,
                    "value_hint": value_hint(r.value),
                    **self.actor_fields(now),
                }
            )
            details = {"source": "backfill", "name": name, "version": 1, "key_id": sealed.key_id}
            entries.append(audit.Entry("secret.backfill", r.org_id, "secret", r.id, details))
        bulk_update(s, SECRETS, updates)
        self.audit(s, entries)
        return Outcome(migrated=len(rows))

    # 2. MCP tokens ---------------------------------------------------------------------------

    def mcp_servers(self) -> None:
        t = legacy.mcp_servers
        columns = [t.c.id, t.c.org_id, t.c.name, t.c.token]
        self.walk("mcp_servers", t, columns, legacy.mcp_pending(), self._move_tokens, self.token_secrets)

    def _move_tokens(self, s: Session, rows: list[Any], known: dict[Any, str]) -> Outcome:
        outcome = Outcome()
        # Servers of one org with the same token share one secret (compared in memory only).
        new_for: dict[tuple[str, str], Any] = {}
        for r in rows:
            key = (r.org_id, r.token)
            if key not in known and key not in new_for:
                new_for[key] = r
        names = self.secret_names.assign(s, [(r.org_id, f"mcp_{slugify(r.name)}_{r.id[:6]}") for r in new_for.values()])
        now = utcnow()
        inserts, entries = [], []
        for (key, r), name in zip(new_for.items(), names, strict=True):
            secret_id = new_id()
            outcome.entries[key] = secret_id
            outcome.created += 1
            if self.dry_run:
                continue
            sealed = seal(self.keys, r.token.encode("utf-8"), secret_context(r.org_id, secret_id, 1))
            inserts.append(
                {
                    "id": secret_id,
                    "org_id": r.org_id,
                    "name": name,
                    "description": f"MCP token of {r.name}"[:1000],
                    "ciphertext": sealed.ciphertext,
                    "key_id": sealed.key_id,
                    "version": 1,
                    "value_hint": value_hint(r.token),
                    "allowed_hosts": [],
                    "created_by": self.ctx.actor.id,
                    "created_at": now,
                    **self.actor_fields(now),
                }
            )
            details = {"source": "backfill", "name": name, "version": 1, "key_id": sealed.key_id}
            entries.append(
                audit.Entry("secret.create", r.org_id, "secret", secret_id, {**details, "mcp_server_id": r.id})
            )
        updates = []
        for r in rows:
            secret_id = outcome.entries.get((r.org_id, r.token)) or known[(r.org_id, r.token)]
            updates.append({"id": r.id, "secret_ref": secret_id, **self.actor_fields(now)})
            details = {"source": "backfill", "changed": ["secret_ref"], "secret_ref": secret_id}
            entries.append(audit.Entry("mcp_server.update", r.org_id, "mcp_server", r.id, details))
        outcome.migrated = len(rows)
        self.write(s, SECRETS, inserts, MCP_SERVERS, updates, entries)
        return outcome

    # 3. agents -> providers ------------------------------------------------------------------

    def agents(self) -> None:
        t = legacy.agents
        columns = [t.c.id, t.c.org_id, t.c.model, t.c.secret_ref, t.c.model_id]
        self.walk("agents", t, columns, legacy.agent_pending(), self._link_agents, self.providers)

    def _link_agents(self, s: Session, rows: list[Any], known: dict[Any, str]) -> Outcome:
        outcome = Outcome()
        refs = {r.secret_ref for r in rows}
        # Same org only: a reference into another org is simply not found.
        sealed_of = {
            (org, sid): sealed
            for sid, org, sealed in s.execute(
                select(Secret.id, Secret.org_id, Secret.ciphertext.is_not(None)).where(Secret.id.in_(refs))
            )
        }
        found: dict[tuple[str, str, str], str] = {}
        for pid, org, ref, kind, model_id in s.execute(
            select(Provider.id, Provider.org_id, Provider.secret_ref, Provider.kind, Provider.model_id)
            .where(Provider.secret_ref.in_(refs))
            .order_by(Provider.created_at, Provider.id)
        ):
            found.setdefault((org, ref, kind), pid)
            self.provider_models.setdefault(pid, model_id)
        links: list[tuple[Any, tuple[str, str, str], str]] = []  # (row, provider key, model id)
        new_keys: dict[tuple[str, str, str], tuple[str, str]] = {}  # key -> (provider type, model id)
        for r in rows:
            parsed = parse_model(r.model)
            if parsed is None:
                outcome.failures.append((r.id, r.org_id, "invalid_model: legacy model is not '{kind}/{model_id}'"))
                continue
            kind, model_id = parsed
            provider_type = PROVIDER_TYPE_FOR_KIND.get(kind)
            if provider_type is None:
                reason = f"unsupported_kind: no provider type for kind {kind!r}; create a provider by hand"
                outcome.failures.append((r.id, r.org_id, reason))
                continue
            sealed = sealed_of.get((r.org_id, r.secret_ref))
            if sealed is None:
                reason = "secret_not_found: the legacy secret_ref points at no secret of this org"
                outcome.failures.append((r.id, r.org_id, reason))
                continue
            if not sealed and r.secret_ref not in self.would_seal:
                outcome.failures.append((r.id, r.org_id, "secret_not_sealed: the legacy secret was not backfilled"))
                continue
            key = (r.org_id, r.secret_ref, kind)
            if key not in known and key not in found and key not in new_keys:
                new_keys[key] = (provider_type, model_id)
            links.append((r, key, model_id))
        names = self.provider_names.assign(s, [(org, f"legacy {kind} {ref[:6]}") for org, ref, kind in new_keys])
        now = utcnow()
        inserts, entries = [], []
        for (key, (provider_type, model_id)), name in zip(new_keys.items(), names, strict=True):
            org, ref, kind = key
            details: dict[str, Any]
            provider_id = new_id()
            outcome.entries[key] = provider_id
            self.provider_models[provider_id] = model_id
            outcome.created += 1
            inserts.append(
                {
                    "id": provider_id,
                    "org_id": org,
                    "name": name,
                    "provider_type": provider_type,
                    "kind": kind,
                    "model_id": model_id,
                    "config": {},
                    "secret_ref": ref,
                    "created_by": self.ctx.actor.id,
                    "created_at": now,
                    **self.actor_fields(now),
                }
            )
            details = {
                "source": "backfill",
                "name": name,
                "provider_type": provider_type,
                "kind": kind,
                "model_id": model_id,
                "secret_ref": ref,
            }
            entries.append(audit.Entry("provider.create", org, "provider", provider_id, details))
        updates = []
        for r, key, model_id in links:
            provider_id = outcome.entries.get(key) or found.get(key) or known[key]
            own_model = model_id if model_id != self.provider_models.get(provider_id) else r.model_id
            updates.append({"id": r.id, "provider_id": provider_id, "model_id": own_model, **self.actor_fields(now)})
            link = {"source": "backfill", "changed": ["provider_id"], "provider_id": provider_id}
            entries.append(audit.Entry("agent.update", r.org_id, "agent", r.id, link))
        outcome.migrated = len(links)
        self.write(s, PROVIDERS, inserts, AGENTS, updates, entries)
        return outcome


def run_backfill(
    db: Database,
    keys: PublicKeySet,
    ctx: RequestContext,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    org_slug: str | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Migrate every legacy row (of one org with ``org_slug``) in this process; see the module doc.

    ``progress(done, total)`` is called once at the start and after each committed batch;
    an exception it raises stops the run after that batch (the batch stays committed).
    A worker runs the same steps split into parts (:func:`plan` and :func:`run_part`).
    """
    check_batch_size(batch_size)
    with db.session() as s:
        org_id = _org_id(s, org_slug)
    summary = run_part(
        db,
        keys,
        ctx,
        None if org_id is None else [org_id],
        dry_run=dry_run,
        batch_size=batch_size,
        org_slug=org_slug,
        progress=progress,
    )
    log.info(
        "backfill %s: secrets %d, mcp servers %d, agents %d migrated; %d failed",
        "dry run" if dry_run else "run",
        summary.secrets.migrated,
        summary.mcp_servers.migrated,
        summary.agents.migrated,
        summary.failed,
    )
    return summary


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}")


def _org_id(session: Session, org_slug: str | None) -> str | None:
    if org_slug is None:
        return None
    org_id = session.scalar(select(Org.id).where(Org.slug == org_slug))
    if org_id is None:
        raise NotFoundError(f"org {org_slug!r} not found")
    return org_id


def plan(
    db: Database, *, org_slug: str | None, part_rows: int, which: int = legacy.PENDING
) -> list[tuple[list[str], int]]:
    """The orgs holding legacy rows, grouped into parts of about ``part_rows`` rows each (with their rows).

    An org is never split: names, shared MCP tokens and providers are decided per org, so a
    part is a set of whole orgs and two parts never touch one org. Rows counted are those
    ``which`` selects (pending for the backfill, all legacy rows for the verify); every org
    carrying legacy rows is in a part (one with nothing pending still counts what it skips).
    Empty once the contract migration dropped the legacy columns.
    """
    with db.session() as s:
        org_id = _org_id(s, org_slug)
        if not legacy.present(s, refresh=True):
            return []
        weights = legacy.rows_by_org(s, which, org_id)
        carrying = legacy.rows_by_org(s, legacy.CARRYING, org_id)
    groups: list[tuple[list[str], int]] = []
    current: list[str] = []
    size = rows = 0
    for org in sorted(carrying):
        current.append(org)
        rows += weights.get(org, 0)
        size += weights.get(org, 0) + 1
        if size >= part_rows:
            groups.append((current, rows))
            current, size, rows = [], 0, 0
    if current:
        groups.append((current, rows))
    return groups


def run_part(
    db: Database,
    keys: PublicKeySet,
    ctx: RequestContext,
    orgs: list[str] | None,
    *,
    dry_run: bool,
    batch_size: int,
    org_slug: str | None = None,
    state: dict[str, Any] | None = None,
    checkpoint: BatchCheckpoint | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Migrate the legacy rows of ``orgs`` (every org with None), as the module doc says.

    ``state``: the totals an earlier attempt of this part committed (its last checkpoint);
    the run carries on from them. ``checkpoint`` is called in each batch's transaction.
    """
    check_batch_size(batch_size)
    if state is not None:
        summary = Summary.restore(state)
    else:
        summary = Summary(dry_run=dry_run, batch_size=batch_size, org=org_slug)
        with db.session() as s:
            if not legacy.present(s, refresh=True):
                log.info("backfill: the legacy columns are gone (contract migration applied); nothing to do")
                return summary
            for kind, (table, _carrying, pending, done) in zip(
                (summary.secrets, summary.mcp_servers, summary.agents), legacy.KINDS.values(), strict=True
            ):
                kind.pending = legacy.count(s, table, pending, orgs)
                kind.skipped = legacy.count(s, table, done, orgs)
    if progress is not None:
        progress(summary.done, summary.total)
    run = _Run(db, keys, ctx, summary, orgs, progress, checkpoint)
    run.secrets()
    run.mcp_servers()
    run.agents()
    return summary
