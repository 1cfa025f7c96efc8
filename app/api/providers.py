"""The provider catalog: any member lists; org admins create, edit and delete."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.api.blueprint import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import ListQuery
from app.identity.access import org_access as access_of
from app.models import Provider
from app.providers import service as providers
from app.schemas import Strict

TAGS = ["providers"]


class ProviderCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    provider_type: str = Field(description="openai | anthropic | openai_compatible | cloudflare_ai_gateway")
    kind: str | None = Field(default=None, description="Fixed for openai/anthropic; required otherwise.")
    model_id: str = Field(min_length=1, max_length=200)
    config: dict[str, Any] | None = Field(
        default=None, description="base_url (openai_compatible: required); account_id + gateway_id (gateway)."
    )
    secret_ref: str = Field(description="Id of a secret of this org holding the provider key.")


class ProviderUpdate(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    provider_type: str | None = None
    kind: str | None = None
    model_id: str | None = Field(default=None, min_length=1, max_length=200)
    config: dict[str, Any] | None = None
    secret_ref: str | None = None


class ProviderOut(BaseModel):
    id: str
    name: str
    provider_type: str
    kind: str
    model_id: str
    model_path: str = Field(description="The unified model path, {kind}/{model_id}.")
    config: dict[str, Any]
    secret_ref: str
    created_at: datetime
    updated_at: datetime


class ProviderList(BaseModel):
    items: list[ProviderOut]
    next_cursor: str | None


def provider_out(p: Provider) -> ProviderOut:
    return ProviderOut(
        id=p.id,
        name=p.name,
        provider_type=p.provider_type,
        kind=p.kind,
        model_id=p.model_id,
        model_path=f"{p.kind}/{p.model_id}",
        config=p.config,
        secret_ref=p.secret_ref,
        created_at=p.created_at,
        updated_at=p.updated_at,
    )


@route(bp, "/orgs/<org>/providers", "GET", query=ListQuery, response=ProviderList, tags=TAGS, errors=[401, 404])
def list_providers(org: str, query: ListQuery) -> ProviderList:
    """List the org's provider catalog."""
    access = access_of(session(), current_user(), org)
    page = providers.list_providers(session(), access.org, limit=query.limit, cursor=query.cursor)
    return ProviderList(items=[provider_out(p) for p in page.items], next_cursor=page.next_cursor)


@route(
    bp,
    "/orgs/<org>/providers",
    "POST",
    body=ProviderCreate,
    response=ProviderOut,
    status=201,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422],
    idempotent=True,
)
def create_provider(org: str, body: ProviderCreate) -> Result:
    """Add a provider (org admin): type, model, and the secret holding its key."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    fields = {name: getattr(body, name) for name in body.model_fields_set}
    return Result(provider_out(providers.create_provider(session(), request_context(), access.org, fields)), 201)


@route(bp, "/orgs/<org>/providers/<provider_id>", "GET", response=ProviderOut, tags=TAGS, errors=[401, 404])
def get_provider(org: str, provider_id: str) -> ProviderOut:
    """One provider."""
    access = access_of(session(), current_user(), org)
    return provider_out(providers.get_provider(session(), access.org, provider_id))


@route(
    bp,
    "/orgs/<org>/providers/<provider_id>",
    "PATCH",
    body=ProviderUpdate,
    response=ProviderOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422],
)
def update_provider(org: str, provider_id: str, body: ProviderUpdate) -> ProviderOut:
    """Edit a provider (org admin)."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    fields = {name: getattr(body, name) for name in body.model_fields_set}
    return provider_out(providers.update_provider(session(), request_context(), access.org, provider_id, fields))


@route(bp, "/orgs/<org>/providers/<provider_id>", "DELETE", status=204, tags=TAGS, errors=[401, 403, 404, 409])
def delete_provider(org: str, provider_id: str) -> None:
    """Delete a provider no agent uses (org admin)."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    providers.delete_provider(session(), request_context(), access.org, provider_id)
