"""The provider catalog: which model, where, with which secret. Agents pick a provider, never a secret.

Every mutation is org-admin only (a provider decides where a secret is sent). The global AI
gateway token is worker configuration, never stored here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.access import OrgAccess
from app.audit import service as audit
from app.context import RequestContext
from app.db import flush_or_raise, new_id, utcnow
from app.errors import ConflictError, NotFoundError
from app.models import Agent, Provider
from app.pagination import Page, paginate
from app.providers import catalog
from app.providers.schemas import ProviderCreate, ProviderUpdate
from app.secrets.service import check_secret_ref


class ProviderInUseError(ConflictError):
    code, title = "provider_in_use", "Provider is in use"


def list_providers(session: Session, access: OrgAccess, *, limit: int, cursor: str | None) -> Page[Provider]:
    """The org's catalog (any member)."""
    stmt = select(Provider).where(Provider.org_id == access.org.id)
    return paginate(session, stmt, Provider.id, limit=limit, cursor=cursor)


def get_provider(session: Session, access: OrgAccess, provider_id: str, *, for_update: bool = False) -> Provider:
    """One entry of the org's catalog (any member)."""
    stmt = select(Provider).where(Provider.org_id == access.org.id, Provider.id == provider_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    provider: Provider | None = session.scalar(stmt)
    if provider is None:
        raise NotFoundError("provider not found")
    return provider


def _flush_unique(session: Session, name: str) -> None:
    flush_or_raise(session, ConflictError(f"a provider named {name!r} already exists in this org"))


def create_provider(session: Session, ctx: RequestContext, access: OrgAccess, data: ProviderCreate) -> Provider:
    """Add a catalog entry (org admin)."""
    access.require_admin()
    org = access.org
    secret_ref = check_secret_ref(session, org, data.secret_ref)
    if session.scalar(select(Provider.id).where(Provider.org_id == org.id, Provider.name == data.name)):
        raise ConflictError(f"a provider named {data.name!r} already exists in this org")
    assert data.kind is not None and data.config is not None  # filled in by ProviderCreate's shape check
    now = utcnow()
    provider = Provider(
        id=new_id(),
        org_id=org.id,
        name=data.name,
        provider_type=data.provider_type,
        kind=data.kind,
        model_id=data.model_id,
        config=data.config,
        secret_ref=secret_ref,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(provider)
    _flush_unique(session, data.name)
    audit.record(
        session,
        ctx,
        "provider.create",
        org_id=org.id,
        target_type="provider",
        target_id=provider.id,
        details={
            "name": data.name,
            "provider_type": data.provider_type,
            "kind": data.kind,
            "model_id": data.model_id,
            "config": data.config,
            "secret_ref": secret_ref,
        },
    )
    return provider


def update_provider(
    session: Session, ctx: RequestContext, access: OrgAccess, provider_id: str, data: ProviderUpdate
) -> Provider:
    """Edit a catalog entry (org admin); type, kind and config are re-checked together."""
    access.require_admin()
    org = access.org
    sent = data.model_dump(exclude_unset=True)
    provider = get_provider(session, access, provider_id, for_update=True)
    if "kind" in sent:
        kind_in = sent["kind"]
    elif "provider_type" in sent:
        kind_in = None  # a new type brings its own kind (or asks for one)
    else:
        kind_in = provider.kind
    shape = catalog.shape(
        sent.get("provider_type", provider.provider_type), kind_in, sent.get("config", provider.config)
    )
    changes: dict[str, Any] = {**sent, **shape._asdict()}
    if "secret_ref" in sent:
        changes["secret_ref"] = check_secret_ref(session, org, sent["secret_ref"])
    changed = [k for k, v in changes.items() if getattr(provider, k) != v]
    if not changed:
        return provider
    if "name" in changed and session.scalar(
        select(Provider.id).where(
            Provider.org_id == org.id, Provider.name == changes["name"], Provider.id != provider.id
        )
    ):
        raise ConflictError(f"a provider named {changes['name']!r} already exists in this org")
    for key in changed:
        setattr(provider, key, changes[key])
    provider.updated_at = utcnow()
    provider.updated_by = ctx.actor.id
    _flush_unique(session, provider.name)
    audit.record(
        session,
        ctx,
        "provider.update",
        org_id=org.id,
        target_type="provider",
        target_id=provider.id,
        details={"changed": sorted(changed), "secret_ref": provider.secret_ref},
    )
    return provider


def delete_provider(session: Session, ctx: RequestContext, access: OrgAccess, provider_id: str) -> None:
    """Delete a catalog entry no agent uses (org admin; 409 listing the agents otherwise)."""
    access.require_admin()
    org = access.org
    provider = get_provider(session, access, provider_id, for_update=True)
    agents = session.execute(
        select(Agent.id, Agent.name).where(Agent.org_id == org.id, Agent.provider_id == provider.id).order_by(Agent.id)
    ).all()
    if agents:
        raise ProviderInUseError(
            f"provider is used by {len(agents)} agent(s)",
            used_by=[{"type": "agent", "id": aid, "name": name} for aid, name in agents],
        )
    session.delete(provider)
    flush_or_raise(session, ProviderInUseError("provider became in use", used_by=[]))
    audit.record(
        session,
        ctx,
        "provider.delete",
        org_id=org.id,
        target_type="provider",
        target_id=provider_id,
        details={"name": provider.name},
    )
