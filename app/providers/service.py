"""The provider catalog: which model, where, with which secret. Agents pick a provider, never a secret.

Every mutation is org-admin only (a provider decides where a secret is sent). The global AI
gateway token is worker configuration, never stored here.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import RequestContext
from app.db import flush_or_raise, new_id, utcnow
from app.egress.urls import UrlError, check_http_url
from app.errors import ConflictError, NotFoundError, ValidationFailedError
from app.models import Agent, Org, Provider
from app.pagination import Page, paginate
from app.secrets.service import check_secret_ref

PROVIDER_TYPES = ("openai", "anthropic", "openai_compatible", "cloudflare_ai_gateway")
# Types whose kind is fixed by the vendor.
FIXED_KIND = {"openai": "openai", "anthropic": "anthropic"}
# Allowed config keys per type, and which of them are required.
CONFIG_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "openai": ({"base_url"}, set()),
    "anthropic": ({"base_url"}, set()),
    "openai_compatible": ({"base_url"}, {"base_url"}),
    "cloudflare_ai_gateway": ({"account_id", "gateway_id"}, {"account_id", "gateway_id"}),
}
KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
GATEWAY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME = 128
MAX_MODEL = 200


class ProviderInUseError(ConflictError):
    code, title = "provider_in_use", "Provider is in use"


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or "\x00" in value:
        raise ValidationFailedError.single("name", f"must be 1 to {MAX_NAME} characters")
    return value.strip()


def _model_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_MODEL or not value.isprintable():
        raise ValidationFailedError.single("model_id", f"must be 1 to {MAX_MODEL} printable characters")
    return value.strip()


def _base_url(value: Any) -> str:
    """An http(s) URL with a host and no userinfo, query or fragment (``app.egress.urls``)."""
    try:
        return check_http_url(value, allow_query=False).rstrip("/")
    except UrlError as exc:
        raise ValidationFailedError.single("config.base_url", str(exc)) from None


def validate_shape(provider_type: Any, kind: Any, config: Any) -> tuple[str, str, dict[str, Any]]:
    """Type, kind and config checked together: each type has its own required fields."""
    if provider_type not in PROVIDER_TYPES:
        raise ValidationFailedError.single("provider_type", "must be one of " + ", ".join(PROVIDER_TYPES))
    fixed = FIXED_KIND.get(provider_type)
    if fixed is not None:
        if kind not in (None, fixed):
            raise ValidationFailedError.single("kind", f"must be {fixed!r} for provider_type {provider_type!r}")
        kind = fixed
    elif not isinstance(kind, str) or not KIND_RE.match(kind):
        raise ValidationFailedError.single("kind", "lowercase letters, digits, '.', '_' or '-', e.g. 'openai'")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValidationFailedError.single("config", "must be an object")
    allowed, required = CONFIG_KEYS[provider_type]
    for key in config:
        if key not in allowed:
            raise ValidationFailedError.single(f"config.{key}", f"is not a setting of {provider_type}")
    for key in sorted(required - config.keys()):
        raise ValidationFailedError.single(f"config.{key}", f"is required for {provider_type}")
    clean: dict[str, Any] = {}
    if "base_url" in config:
        clean["base_url"] = _base_url(config["base_url"])
    for key in ("account_id", "gateway_id"):
        if key in config:
            if not isinstance(config[key], str) or not GATEWAY_ID_RE.match(config[key]):
                raise ValidationFailedError.single(f"config.{key}", "letters, digits, '_' or '-' (max 64)")
            clean[key] = config[key]
    return str(provider_type), str(kind), clean


def list_providers(session: Session, org: Org, *, limit: int, cursor: str | None) -> Page[Provider]:
    return paginate(session, select(Provider).where(Provider.org_id == org.id), Provider.id, limit=limit, cursor=cursor)


def get_provider(session: Session, org: Org, provider_id: str, *, for_update: bool = False) -> Provider:
    stmt = select(Provider).where(Provider.org_id == org.id, Provider.id == provider_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    provider: Provider | None = session.scalar(stmt)
    if provider is None:
        raise NotFoundError("provider not found")
    return provider


def _flush_unique(session: Session, name: str) -> None:
    flush_or_raise(session, ConflictError(f"a provider named {name!r} already exists in this org"))


def create_provider(session: Session, ctx: RequestContext, org: Org, fields: dict[str, Any]) -> Provider:
    """Add a catalog entry (org admin)."""
    name = _name(fields.get("name"))
    provider_type, kind, config = validate_shape(fields.get("provider_type"), fields.get("kind"), fields.get("config"))
    model_id = _model_id(fields.get("model_id"))
    secret_ref = check_secret_ref(session, org, fields.get("secret_ref"))
    if session.scalar(select(Provider.id).where(Provider.org_id == org.id, Provider.name == name)):
        raise ConflictError(f"a provider named {name!r} already exists in this org")
    now = utcnow()
    provider = Provider(
        id=new_id(),
        org_id=org.id,
        name=name,
        provider_type=provider_type,
        kind=kind,
        model_id=model_id,
        config=config,
        secret_ref=secret_ref,
        created_by=ctx.actor.id,
        updated_by=ctx.actor.id,
        created_at=now,
        updated_at=now,
    )
    session.add(provider)
    _flush_unique(session, name)
    audit.record(
        session,
        ctx,
        "provider.create",
        org_id=org.id,
        target_type="provider",
        target_id=provider.id,
        details={
            "name": name,
            "provider_type": provider_type,
            "kind": kind,
            "model_id": model_id,
            "config": config,
            "secret_ref": secret_ref,
        },
    )
    return provider


def update_provider(
    session: Session, ctx: RequestContext, org: Org, provider_id: str, fields: dict[str, Any]
) -> Provider:
    """Edit a catalog entry (org admin); type, kind and config are re-checked together."""
    if not fields:
        raise ValidationFailedError.single("body", "give at least one field to change")
    provider = get_provider(session, org, provider_id, for_update=True)
    if "kind" in fields:
        kind_in = fields["kind"]
    elif "provider_type" in fields:
        kind_in = None  # a new type brings its own kind (or asks for one)
    else:
        kind_in = provider.kind
    provider_type, kind, config = validate_shape(
        fields.get("provider_type", provider.provider_type), kind_in, fields.get("config", provider.config)
    )
    changes: dict[str, Any] = {"provider_type": provider_type, "kind": kind, "config": config}
    if "name" in fields:
        changes["name"] = _name(fields["name"])
    if "model_id" in fields:
        changes["model_id"] = _model_id(fields["model_id"])
    if "secret_ref" in fields:
        changes["secret_ref"] = check_secret_ref(session, org, fields["secret_ref"])
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


def delete_provider(session: Session, ctx: RequestContext, org: Org, provider_id: str) -> None:
    """Delete a catalog entry no agent uses (409 listing the agents otherwise)."""
    provider = get_provider(session, org, provider_id, for_update=True)
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
