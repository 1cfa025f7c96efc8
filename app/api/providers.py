"""The provider catalog: any member lists; org admins create, edit and delete."""

from __future__ import annotations

from app.access import OrgAccess
from app.api.blueprint import bp
from app.api.request import request_context, session
from app.api.routing import Result, route
from app.api.schemas import ListQuery
from app.providers import service as providers
from app.providers.schemas import ProviderCreate, ProviderList, ProviderOut, ProviderUpdate

TAGS = ["providers"]


@route(
    bp,
    "/orgs/<org>/providers",
    "GET",
    query=ListQuery,
    response=ProviderList,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def list_providers(access: OrgAccess, query: ListQuery) -> ProviderList:
    """List the org's provider catalog."""
    page = providers.list_providers(session(), access, limit=query.limit, cursor=query.cursor)
    return ProviderList.model_validate(page)


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
    org_role="admin",
)
def create_provider(access: OrgAccess, body: ProviderCreate) -> Result:
    """Add a provider (org admin): type, model, and the secret holding its key."""
    provider = providers.create_provider(session(), request_context(), access, body)
    return Result(ProviderOut.model_validate(provider), 201)


@route(
    bp,
    "/orgs/<org>/providers/<provider_id>",
    "GET",
    response=ProviderOut,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def get_provider(access: OrgAccess, provider_id: str) -> ProviderOut:
    """One provider."""
    return ProviderOut.model_validate(providers.get_provider(session(), access, provider_id))


@route(
    bp,
    "/orgs/<org>/providers/<provider_id>",
    "PATCH",
    body=ProviderUpdate,
    response=ProviderOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422],
    org_role="admin",
)
def update_provider(access: OrgAccess, provider_id: str, body: ProviderUpdate) -> ProviderOut:
    """Edit a provider (org admin)."""
    provider = providers.update_provider(session(), request_context(), access, provider_id, body)
    return ProviderOut.model_validate(provider)


@route(
    bp,
    "/orgs/<org>/providers/<provider_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404, 409],
    org_role="admin",
)
def delete_provider(access: OrgAccess, provider_id: str) -> None:
    """Delete a provider no agent uses (org admin)."""
    providers.delete_provider(session(), request_context(), access, provider_id)
