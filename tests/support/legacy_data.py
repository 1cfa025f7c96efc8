"""Legacy data (revision 0001) for the backfill, verify and contract tests, and checks on it.

Several orgs, shared and distinct tokens, agents sharing a secret, odd names and unicode,
and agents the backfill must refuse (see BAD_AGENTS).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select

from app.backfill import legacy
from app.context import Actor, RequestContext
from app.db import Database
from app.models import Agent, AuditEvent, McpServer, Provider, Secret
from app.secrets.keyring import Keyring
from app.secrets.sealing import open_sealed, secret_context

CTX = RequestContext(Actor("cli", "test"))
ORG_A, ORG_B, ORG_C = (f"00000000-0000-7000-8000-00000000000{c}" for c in "abc")


def _id(prefix: str, n: int) -> str:
    return f"{prefix}-0000-7000-8000-{n:012d}"


# Two ids sharing their first 8 characters: their `legacy_<8>` names collide.
SA1, SA1B, SA2, SA3 = _id("a1a1a1a1", 1), _id("a1a1a1a1", 2), _id("a2a2a2a2", 3), _id("a3a3a3a3", 4)
SB1, SC1 = _id("b1b1b1b1", 5), _id("c1c1c1c1", 6)
UNICODE_VALUE = "pässwörd 🔑 秘密 'quoted' \"double\"\nsecond line"
TOKEN_SHARED, TOKEN_OTHER = "mcp-shared-token-0123456789abcdef", "mcp-ünïcode-token-🔑-0123456789"

LEGACY_SECRETS = {
    SA1: (ORG_A, UNICODE_VALUE),
    SA1B: (ORG_A, "x"),
    SA2: (ORG_A, "sk-openai-and-anthropic-key-0123456789"),
    SA3: (ORG_A, " leading and trailing spaces "),
    SB1: (ORG_B, "sk-org-b-key-0123456789abcdefghij"),
    SC1: (ORG_C, "sk-org-c"),
}
MCP = {
    _id("d0000000", 1): (ORG_A, "Docs Server ü", TOKEN_SHARED),
    _id("d0000000", 2): (ORG_A, "docs / beta!!", TOKEN_SHARED),
    _id("d0000000", 3): (ORG_A, "日本語", TOKEN_OTHER),
    _id("d0000000", 4): (ORG_B, "Docs Server ü", TOKEN_SHARED),
    _id("d0000000", 5): (ORG_C, "x" * 200, "tok-c"),
}
# agent id -> (org, model, secret_ref)
AGENTS = {
    _id("e0000000", 1): (ORG_A, "openai/gpt-4o", SA2),
    _id("e0000000", 2): (ORG_A, "openai/gpt-4o-mini", SA2),
    _id("e0000000", 3): (ORG_A, "anthropic/claude-3-5-sonnet", SA2),
    _id("e0000000", 4): (ORG_A, "openai/gpt-4o", SA3),
    _id("e0000000", 5): (ORG_B, "openai/gpt-4o", SB1),
    _id("e0000000", 6): (ORG_C, "anthropic/claude-3-opus", SC1),
    _id("e0000000", 7): (ORG_C, "openai/o1", SC1),
}
# Agents the backfill must refuse, and why.
BAD_AGENTS = {
    _id("f0000000", 1): (ORG_A, "openai/gpt-4o", _id("99999999", 9), "secret_not_found"),
    _id("f0000000", 2): (ORG_A, "openai/gpt-4o", SB1, "secret_not_found"),  # another org's secret
    _id("f0000000", 3): (ORG_A, "mistral/large", SA2, "unsupported_kind"),
    _id("f0000000", 4): (ORG_B, "no-slash", SB1, "invalid_model"),
}
EXPECTED_PROVIDERS = 6  # (A,SA2,openai) (A,SA2,anthropic) (A,SA3,openai) (B,SB1,openai) (C,SC1,anthropic|openai)


def insert_legacy(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for org, slug in ((ORG_A, "acme"), (ORG_B, "bravo"), (ORG_C, "charlie")):
                conn.execute(
                    sa.text("INSERT INTO orgs (id, slug, name) VALUES (:id, :slug, :name)"),
                    {"id": org, "slug": slug, "name": slug.title()},
                )
            for sid, (org, value) in LEGACY_SECRETS.items():
                conn.execute(
                    sa.text("INSERT INTO secrets (id, org_id, value) VALUES (:id, :org, :v)"),
                    {"id": sid, "org": org, "v": value},
                )
            for mid, (org, name, token) in MCP.items():
                conn.execute(
                    sa.text("INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :org, :n, :u, :t)"),
                    {"id": mid, "org": org, "n": name, "u": "https://mcp.example.com/mcp", "t": token},
                )
            for aid, (org, model, ref) in AGENTS.items():
                conn.execute(
                    sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :n, :m, :r)"),
                    {"id": aid, "org": org, "n": f"agent {aid[:4]}", "m": model, "r": ref},
                )
            for aid, (org, model, ref, _reason) in BAD_AGENTS.items():
                conn.execute(
                    sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :n, :m, :r)"),
                    {"id": aid, "org": org, "n": "bad", "m": model, "r": ref},
                )
    finally:
        engine.dispose()


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.session() as s:
        for name in ("secrets", "mcp_servers", "agents", "providers"):
            rows = s.execute(sa.text(f"SELECT * FROM {name} ORDER BY id")).all()
            out[name] = [tuple(r) for r in rows]
    return out


def opens(keyring: Keyring, secret: Secret) -> str:
    assert secret.ciphertext is not None
    plain = open_sealed(keyring, secret.ciphertext, secret_context(secret.org_id, secret.id, secret.version))
    return plain.decode("utf-8")


def assert_complete(
    db: Database, keyring: Keyring, extra_servers: dict[str, str] | None = None, extra_org: dict[str, str] | None = None
) -> None:
    """Everything migrated, every reference opens to its legacy value, tenancy, no duplicates."""
    with db.session() as s:
        secrets = {x.id: x for x in s.scalars(select(Secret))}
        for sid, (org, value) in LEGACY_SECRETS.items():
            secret = secrets[sid]
            assert secret.org_id == org and secret.version == 1 and secret.key_id == keyring.current_kid
            assert secret.name and secret.name.startswith(f"legacy_{sid[:8]}")
            assert opens(keyring, secret) == value
            # Kept for verify; the contract migration drops it.
            assert s.scalar(select(legacy.secrets.c.value).where(legacy.secrets.c.id == sid)) == value
        names = [(x.org_id, x.name) for x in secrets.values()]
        assert len(names) == len(set(names))

        servers = {m.id: m for m in s.scalars(select(McpServer))}
        for mid, (org, _name, token) in MCP.items():
            ref = servers[mid].secret_ref
            assert ref is not None and secrets[ref].org_id == org
            assert opens(keyring, secrets[ref]) == token
            assert secrets[ref].name and secrets[ref].name.startswith("mcp_")

        for mid, token in (extra_servers or {}).items():
            org = (extra_org or {}).get(mid, ORG_B)
            ref = servers[mid].secret_ref
            assert ref is not None and secrets[ref].org_id == org and opens(keyring, secrets[ref]) == token
        # No orphan (so no duplicate): every sealed secret is a legacy one or held by a server.
        held = {m.secret_ref for m in servers.values()}
        assert set(secrets) == set(LEGACY_SECRETS) | held

        providers = {p.id: p for p in s.scalars(select(Provider))}
        assert len(providers) == EXPECTED_PROVIDERS
        triples = [(p.org_id, p.secret_ref, p.kind) for p in providers.values()]
        assert len(triples) == len(set(triples))
        agents = {a.id: a for a in s.scalars(select(Agent))}
        for aid, (org, model, ref) in AGENTS.items():
            agent = agents[aid]
            assert agent.provider_id is not None
            provider = providers[agent.provider_id]
            kind, model_id = model.split("/", 1)
            assert provider.org_id == org and provider.secret_ref == ref and provider.kind == kind
            assert provider.provider_type == kind and provider.config == {}
            assert (agent.model_id or provider.model_id) == model_id
        for aid in BAD_AGENTS:
            assert agents[aid].provider_id is None


def counts(db: Database) -> tuple[int, int, int]:
    with db.session() as s:
        return (
            int(s.scalar(select(func.count()).select_from(Secret)) or 0),
            int(s.scalar(select(func.count()).select_from(Provider)) or 0),
            int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0),
        )
