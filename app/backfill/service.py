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
from collections.abc import Callable, Generator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.db import Database, new_id, utcnow
from app.errors import NotFoundError
from app.models import Agent, McpServer, Org, Provider, Secret
from app.observability import redact
from app.providers.service import KIND_RE
from app.secrets.keyring import PublicKeySet
from app.secrets.sealing import seal, secret_context
from app.secrets.service import NAME_RE, value_hint

log = logging.getLogger("latchkey.backfill")

BACKFILL_TASK = "backfill.run"
DEFAULT_BATCH_SIZE = 200
MAX_BATCH_SIZE = 5000
MAX_FAILURES_LISTED = 100
# Legacy kind -> provider type. Other kinds have no faithful mapping (see the module doc).
PROVIDER_TYPE_FOR_KIND = {"openai": "openai", "anthropic": "anthropic"}

Progress = Callable[[int, int], None]


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


# Which rows each step migrates, and which it counts as already migrated ----------------------


def _secret_pending() -> Any:
    return (Secret.value.is_not(None)) & (Secret.ciphertext.is_(None))


def _secret_done() -> Any:
    return (Secret.value.is_not(None)) & (Secret.ciphertext.is_not(None))


def _mcp_pending() -> Any:
    return (McpServer.token.is_not(None)) & (McpServer.secret_ref.is_(None))


def _mcp_done() -> Any:
    return (McpServer.token.is_not(None)) & (McpServer.secret_ref.is_not(None))


def _agent_pending() -> Any:
    return (Agent.model.is_not(None)) & (Agent.secret_ref.is_not(None)) & (Agent.provider_id.is_(None))


def _agent_done() -> Any:
    return (Agent.model.is_not(None)) & (Agent.secret_ref.is_not(None)) & (Agent.provider_id.is_not(None))


def _count(session: Session, model: Any, condition: Any, org_id: str | None) -> int:
    stmt = select(func.count()).select_from(model).where(condition)
    if org_id is not None:
        stmt = stmt.where(model.org_id == org_id)
    return int(session.scalar(stmt) or 0)


def remaining(db: Database, org_id: str | None = None) -> dict[str, int]:
    """Rows still to migrate, per kind."""
    with db.session() as s:
        return {
            "secrets": _count(s, Secret, _secret_pending(), org_id),
            "mcp_servers": _count(s, McpServer, _mcp_pending(), org_id),
            "agents": _count(s, Agent, _agent_pending(), org_id),
        }


# Names ----------------------------------------------------------------------------------------


def slugify(text: str, max_len: int = 80) -> str:
    """ASCII, lowercase, runs of anything else as one ``_``; ``server`` when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", ascii_text.lower()).strip("_")[:max_len].strip("_")
    return slug or "server"


def _secret_name_free(session: Session, org_id: str, name: str) -> bool:
    return session.scalar(select(Secret.id).where(Secret.org_id == org_id, Secret.name == name)) is None


def unique_secret_name(session: Session, org_id: str, base: str, taken: set[tuple[str, str]]) -> str:
    """``base``, or ``base_2``, ``base_3``... : the first name free in the org (and in ``taken``)."""
    candidate, n = base, 1
    while (org_id, candidate) in taken or not _secret_name_free(session, org_id, candidate):
        n += 1
        suffix = f"_{n}"
        candidate = base[: 128 - len(suffix)] + suffix
    assert NAME_RE.match(candidate), candidate
    taken.add((org_id, candidate))
    return candidate


def unique_provider_name(session: Session, org_id: str, base: str, taken: set[tuple[str, str]]) -> str:
    candidate, n = base, 1
    while (org_id, candidate) in taken or session.scalar(
        select(Provider.id).where(Provider.org_id == org_id, Provider.name == candidate)
    ):
        n += 1
        candidate = f"{base} {n}"
    taken.add((org_id, candidate))
    return candidate


def parse_model(model: str) -> tuple[str, str] | None:
    """Legacy ``{kind}/{model_id}`` -> (kind, model_id); None when malformed."""
    kind, sep, model_id = model.partition("/")
    kind, model_id = kind.strip().lower(), model_id.strip()
    if not sep or not model_id or len(model_id) > 200 or not KIND_RE.match(kind):
        return None
    return kind, model_id


# The run ------------------------------------------------------------------------------------


class _Run:
    def __init__(
        self,
        db: Database,
        keys: PublicKeySet,
        ctx: RequestContext,
        summary: Summary,
        org_id: str | None,
        progress: Progress | None,
    ) -> None:
        self.db, self.keys, self.ctx, self.summary = db, keys, ctx, summary
        self.org_id, self.progress = org_id, progress
        self.dry_run = summary.dry_run
        # (org_id, token) -> secret id, for servers sharing a token; committed batches only.
        self.token_secrets: dict[tuple[str, str], str] = {}
        # (org_id, legacy secret id, kind) -> provider id; committed batches only.
        self.providers: dict[tuple[str, str, str], str] = {}
        # Names handed out in a dry run (nothing is written, so the database cannot tell).
        self.names: set[tuple[str, str]] = set()
        self.provider_names: set[tuple[str, str]] = set()
        # Legacy secrets a dry run would have sealed (agents may point at them).
        self.would_seal: set[str] = set()

    def audit(
        self, session: Session, action: str, org_id: str, target_type: str, target_id: str, **details: Any
    ) -> None:
        if not self.dry_run:
            audit.record(
                session,
                self.ctx,
                action,
                org_id=org_id,
                target_type=target_type,
                target_id=target_id,
                details={"source": "backfill", **details},
            )

    def batches(self, model: Any, condition: Any) -> Generator[tuple[Session, list[Any]], None, None]:
        """Yield (session, rows) per batch; commits after each (rolls back in a dry run).

        Callers close the generator (``closing``), so an error ends the batch's transaction
        (rolled back) at once instead of when the generator is collected.
        """
        last: str | None = None
        batch_size = self.summary.batch_size
        while True:
            stmt = select(model).where(condition)
            if self.org_id is not None:
                stmt = stmt.where(model.org_id == self.org_id)
            if last is not None:
                stmt = stmt.where(model.id > last)
            stmt = stmt.order_by(model.id).limit(batch_size).with_for_update()
            with self.db.session() as s:
                rows = list(s.scalars(stmt))
                if not rows:
                    return
                last = rows[-1].id
                yield s, rows
                if self.dry_run:
                    s.rollback()
            if self.progress is not None:
                self.progress(self.summary.done, max(self.summary.total, self.summary.done))

    # 1. legacy secrets -------------------------------------------------------------------------

    def secrets(self) -> None:
        kind = self.summary.secrets
        with closing(self.batches(Secret, _secret_pending())) as batches:
            for s, rows in batches:
                for secret in rows:
                    try:
                        with s.begin_nested():
                            self._seal_legacy(s, secret)
                    except IntegrityError:
                        kind.fail(secret.id, secret.org_id, "conflict (a concurrent change); run the backfill again")
                        continue
                    kind.migrated += 1

    def _seal_legacy(self, s: Session, secret: Secret) -> None:
        value = secret.value
        assert value is not None
        redact.register(value)
        name = secret.name if secret.name and NAME_RE.match(secret.name) else None
        if name is None:
            name = unique_secret_name(s, secret.org_id, f"legacy_{secret.id[:8]}", self.names)
        self.would_seal.add(secret.id)
        if self.dry_run:
            return
        sealed = seal(self.keys, value.encode("utf-8"), secret_context(secret.org_id, secret.id, 1))
        now = utcnow()
        secret.name = name
        secret.version = 1
        secret.ciphertext = sealed.ciphertext
        secret.key_id = sealed.key_id
        secret.value_hint = value_hint(value)
        secret.updated_at = now
        secret.updated_by = self.ctx.actor.id
        s.flush()
        self.audit(s, "secret.backfill", secret.org_id, "secret", secret.id, name=name, version=1, key_id=sealed.key_id)

    # 2. MCP tokens ---------------------------------------------------------------------------

    def mcp_servers(self) -> None:
        kind = self.summary.mcp_servers
        with closing(self.batches(McpServer, _mcp_pending())) as batches:
            for s, rows in batches:
                batch_map: dict[tuple[str, str], str] = {}
                created = 0
                for server in rows:
                    try:
                        with s.begin_nested():
                            new = self._move_token(s, server, batch_map)
                    except IntegrityError:
                        kind.fail(server.id, server.org_id, "conflict (a concurrent change); run the backfill again")
                        continue
                    created += 1 if new else 0
                    kind.migrated += 1
                # Only now may later batches reuse these secrets (a failed batch rolled them back).
                self.token_secrets.update(batch_map)
                self.summary.secrets_created += created

    def _move_token(self, s: Session, server: McpServer, batch_map: dict[tuple[str, str], str]) -> bool:
        token = server.token
        assert token is not None
        redact.register(token)
        key = (server.org_id, token)
        existing = batch_map.get(key) or self.token_secrets.get(key)
        created = existing is None
        if existing is None:
            name = unique_secret_name(s, server.org_id, f"mcp_{slugify(server.name)}_{server.id[:6]}", self.names)
            secret_id = new_id()
            existing = secret_id
            if self.dry_run:
                batch_map[key] = existing
                return True
            sealed = seal(self.keys, token.encode("utf-8"), secret_context(server.org_id, secret_id, 1))
            now = utcnow()
            s.add(
                Secret(
                    id=secret_id,
                    org_id=server.org_id,
                    name=name,
                    description=f"MCP token of {server.name}"[:1000],
                    ciphertext=sealed.ciphertext,
                    key_id=sealed.key_id,
                    version=1,
                    value_hint=value_hint(token),
                    allowed_hosts=[],
                    created_by=self.ctx.actor.id,
                    updated_by=self.ctx.actor.id,
                    created_at=now,
                    updated_at=now,
                )
            )
            s.flush()
            self.audit(
                s,
                "secret.create",
                server.org_id,
                "secret",
                secret_id,
                name=name,
                version=1,
                key_id=sealed.key_id,
                mcp_server_id=server.id,
            )
        if self.dry_run:
            batch_map[key] = existing
            return created
        server.secret_ref = existing
        server.updated_at = utcnow()
        server.updated_by = self.ctx.actor.id
        s.flush()
        batch_map[key] = existing
        self.audit(
            s, "mcp_server.update", server.org_id, "mcp_server", server.id, changed=["secret_ref"], secret_ref=existing
        )
        return created

    # 3. agents -> providers ------------------------------------------------------------------

    def agents(self) -> None:
        kind = self.summary.agents
        with closing(self.batches(Agent, _agent_pending())) as batches:
            for s, rows in batches:
                batch_map: dict[tuple[str, str, str], str] = {}
                created = 0
                for agent in rows:
                    try:
                        with s.begin_nested():
                            outcome = self._link_agent(s, agent, batch_map)
                    except IntegrityError:
                        kind.fail(agent.id, agent.org_id, "conflict (a concurrent change); run the backfill again")
                        continue
                    if isinstance(outcome, str):
                        kind.fail(agent.id, agent.org_id, outcome)
                        continue
                    created += 1 if outcome else 0
                    kind.migrated += 1
                self.providers.update(batch_map)
                self.summary.providers_created += created

    def _link_agent(self, s: Session, agent: Agent, batch_map: dict[tuple[str, str, str], str]) -> bool | str:
        """True: provider created; False: existing provider reused; str: why not migrated."""
        assert agent.model is not None and agent.secret_ref is not None
        parsed = parse_model(agent.model)
        if parsed is None:
            return "invalid_model: legacy model is not '{kind}/{model_id}'"
        kind, model_id = parsed
        provider_type = PROVIDER_TYPE_FOR_KIND.get(kind)
        if provider_type is None:
            return f"unsupported_kind: no provider type for kind {kind!r}; create a provider by hand"
        # Same org only: a reference into another org is simply not found.
        secret = s.scalar(select(Secret).where(Secret.org_id == agent.org_id, Secret.id == agent.secret_ref))
        if secret is None:
            return "secret_not_found: the legacy secret_ref points at no secret of this org"
        if secret.ciphertext is None and secret.id not in self.would_seal:
            return "secret_not_sealed: the legacy secret was not backfilled"
        key = (agent.org_id, secret.id, kind)
        provider_id = batch_map.get(key) or self.providers.get(key)
        provider_model = None
        if provider_id is None:
            found = s.scalar(
                select(Provider)
                .where(Provider.org_id == agent.org_id, Provider.secret_ref == secret.id, Provider.kind == kind)
                .order_by(Provider.created_at, Provider.id)
                .limit(1)
            )
            if found is not None:
                provider_id, provider_model = found.id, found.model_id
        else:
            provider_model = s.scalar(select(Provider.model_id).where(Provider.id == provider_id))
        created = provider_id is None
        if provider_id is None:
            name = unique_provider_name(s, agent.org_id, f"legacy {kind} {secret.id[:6]}", self.provider_names)
            provider_id, provider_model = new_id(), model_id
            if self.dry_run:
                batch_map[key] = provider_id
                return True
            now = utcnow()
            s.add(
                Provider(
                    id=provider_id,
                    org_id=agent.org_id,
                    name=name,
                    provider_type=provider_type,
                    kind=kind,
                    model_id=model_id,
                    config={},
                    secret_ref=secret.id,
                    created_by=self.ctx.actor.id,
                    updated_by=self.ctx.actor.id,
                    created_at=now,
                    updated_at=now,
                )
            )
            s.flush()
            self.audit(
                s,
                "provider.create",
                agent.org_id,
                "provider",
                provider_id,
                name=name,
                provider_type=provider_type,
                kind=kind,
                model_id=model_id,
                secret_ref=secret.id,
            )
        elif provider_model is None:
            # A dry run's provider is not in the database: remember its model from the map.
            provider_model = model_id
        if self.dry_run:
            batch_map[key] = provider_id
            return created
        agent.provider_id = provider_id
        if model_id != provider_model:
            agent.model_id = model_id
        agent.updated_at = utcnow()
        agent.updated_by = self.ctx.actor.id
        s.flush()
        batch_map[key] = provider_id
        self.audit(s, "agent.update", agent.org_id, "agent", agent.id, changed=["provider_id"], provider_id=provider_id)
        return created


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
    """Migrate every legacy row (of one org with ``org_slug``); see the module doc.

    ``progress(done, total)`` is called once at the start and after each committed batch;
    an exception it raises stops the run after that batch (the batch stays committed).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in 1..{MAX_BATCH_SIZE}")
    summary = Summary(dry_run=dry_run, batch_size=batch_size, org=org_slug)
    org_id: str | None = None
    with db.session() as s:
        if org_slug is not None:
            org_id = s.scalar(select(Org.id).where(Org.slug == org_slug))
            if org_id is None:
                raise NotFoundError(f"org {org_slug!r} not found")
        summary.secrets.pending = _count(s, Secret, _secret_pending(), org_id)
        summary.secrets.skipped = _count(s, Secret, _secret_done(), org_id)
        summary.mcp_servers.pending = _count(s, McpServer, _mcp_pending(), org_id)
        summary.mcp_servers.skipped = _count(s, McpServer, _mcp_done(), org_id)
        summary.agents.pending = _count(s, Agent, _agent_pending(), org_id)
        summary.agents.skipped = _count(s, Agent, _agent_done(), org_id)
    if progress is not None:
        progress(0, summary.total)
    run = _Run(db, keys, ctx, summary, org_id, progress)
    run.secrets()
    run.mcp_servers()
    run.agents()
    log.info(
        "backfill %s: secrets %d, mcp servers %d, agents %d migrated; %d failed",
        "dry run" if dry_run else "run",
        summary.secrets.migrated,
        summary.mcp_servers.migrated,
        summary.agents.migrated,
        summary.failed,
    )
    return summary
