"""Secrets: metadata for any member; create, edit, delete and reveal for org admins."""

from __future__ import annotations

from flask import Response, after_this_request, current_app, request

from app.access import OrgAccess
from app.api.blueprint import bp
from app.api.request import request_context, session
from app.api.routing import Result, route
from app.api.schemas import ListQuery
from app.errors import RateLimitedError, ServiceUnavailableError
from app.secrets import reveal as reveals
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate, SecretList, SecretOut, SecretRevealed, SecretUpdate

TAGS = ["secrets"]


def _keys() -> PublicKeySet:
    keys: PublicKeySet | None = current_app.extensions["latchkey.public_keys"]
    if keys is None:
        raise ServiceUnavailableError("sealing keys are not configured (set LATCHKEY_PUBLIC_KEYS)")
    return keys


def _with_etag(secret: SecretOut, status: int | None = None) -> Result:
    return Result(secret, status, {"ETag": f'"{secret.version}"'})


@route(
    bp,
    "/orgs/<org>/secrets",
    "GET",
    query=ListQuery,
    response=SecretList,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def list_secrets(access: OrgAccess, query: ListQuery) -> SecretList:
    """List the org's secrets (metadata only, never values)."""
    return SecretList.model_validate(secrets.list_secrets(session(), access, limit=query.limit, cursor=query.cursor))


@route(
    bp,
    "/orgs/<org>/secrets",
    "POST",
    body=SecretCreate,
    response=SecretOut,
    status=201,
    tags=TAGS,
    errors=[401, 403, 404, 409, 422],
    idempotent=True,
    org_role="admin",
)
def create_secret(access: OrgAccess, body: SecretCreate) -> Result:
    """Create a secret (org admin). The value is sealed at once and never returned."""
    return _with_etag(secrets.create_secret(session(), request_context(), access, _keys(), body), 201)


@route(
    bp,
    "/orgs/<org>/secrets/<secret_id>",
    "GET",
    response=SecretOut,
    tags=TAGS,
    errors=[401, 404],
    org_role="member",
)
def get_secret(access: OrgAccess, secret_id: str) -> Result:
    """Get a secret's metadata; the ETag is its version."""
    return _with_etag(secrets.get_secret(session(), access, secret_id))


@route(
    bp,
    "/orgs/<org>/secrets/<secret_id>",
    "PATCH",
    body=SecretUpdate,
    response=SecretOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 412, 422],
    headers=["If-Match"],
    org_role="admin",
)
def update_secret(access: OrgAccess, secret_id: str, body: SecretUpdate) -> Result:
    """Edit a secret (org admin); a new value bumps the version. Honours If-Match."""
    if_match = secrets.parse_if_match(request.headers.get("If-Match"))
    return _with_etag(
        secrets.update_secret(session(), request_context(), access, _keys(), secret_id, body, if_match=if_match)
    )


@route(
    bp,
    "/orgs/<org>/secrets/<secret_id>",
    "DELETE",
    status=204,
    tags=TAGS,
    errors=[401, 403, 404, 409],
    org_role="admin",
)
def delete_secret(access: OrgAccess, secret_id: str) -> None:
    """Delete a secret (org admin); refused with 409 while anything references it."""
    secrets.delete_secret(session(), request_context(), access, secret_id)


# A revealed value must not be kept by any cache, shared or private, old or new.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _retry_after(seconds: int) -> None:
    @after_this_request
    def add_header(resp: Response) -> Response:
        resp.headers["Retry-After"] = str(seconds)
        return resp


def reveal_now(access: OrgAccess, secret_id: str) -> reveals.RevealResult:
    """Reveal for this request (API and UI): the worker round trip with this app's settings."""
    settings = current_app.config["LATCHKEY_SETTINGS"]
    return reveals.reveal(
        session(),
        request_context(),
        access,
        secret_id,
        redis=current_app.extensions["latchkey.redis"],
        timeout=settings.reveal_timeout_seconds,
        rate_limit=settings.reveal_rate_limit,
    )


@route(
    bp,
    "/orgs/<org>/secrets/<secret_id>/reveal",
    "POST",
    response=SecretRevealed,
    tags=TAGS,
    errors=[401, 403, 404, 429, 503],
    org_role="admin",
)
def reveal_secret(access: OrgAccess, secret_id: str) -> Result:
    """Reveal a secret's current value (org admin; audited, rate-limited, never cached).

    A worker resolves the value and seals it to a key that exists only for this request;
    503 ``worker_unavailable`` when no worker answers in time, 429 ``rate_limited`` with
    ``Retry-After`` over the per-user limit or a limit the worker enforces itself (per user,
    org, instance), 403 ``reveal_disabled`` when the workers' configuration turns reveal off.
    """
    try:
        revealed = reveal_now(access, secret_id)
    except RateLimitedError as exc:
        _retry_after(int(exc.extra.get("retry_after", reveals.RATE_WINDOW_SECONDS)))
        raise
    return Result(SecretRevealed.model_validate(revealed), headers=dict(NO_STORE))
