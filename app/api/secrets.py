"""Secrets: metadata for any member; create, edit, delete and reveal for org admins."""

from __future__ import annotations

from flask import Response, after_this_request, current_app, request

from app.api.blueprint import bp
from app.api.framework import Result, current_user, request_context, route, session
from app.api.schemas import (
    ListQuery,
    SecretCreate,
    SecretList,
    SecretOut,
    SecretRevealed,
    SecretUpdate,
    SecretUserOut,
)
from app.errors import RateLimitedError, ServiceUnavailableError
from app.identity.access import org_access as access_of
from app.models import Org, Secret
from app.secrets import reveal as reveals
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.service import SecretUser

TAGS = ["secrets"]


def _keys() -> PublicKeySet:
    keys: PublicKeySet | None = current_app.extensions["latchkey.public_keys"]
    if keys is None:
        raise ServiceUnavailableError("sealing keys are not configured (set LATCHKEY_PUBLIC_KEYS)")
    return keys


def secret_out(secret: Secret, users: list[SecretUser]) -> SecretOut:
    assert secret.name is not None
    return SecretOut(
        id=secret.id,
        name=secret.name,
        description=secret.description,
        version=secret.version,
        value_hint=secret.value_hint,
        allowed_hosts=secret.allowed_hosts or [],
        created_at=secret.created_at,
        updated_at=secret.updated_at,
        rotated_at=secret.rotated_at,
        created_by=secret.created_by,
        updated_by=secret.updated_by,
        used_by=[SecretUserOut(**u.as_dict()) for u in users],
    )


def _etag(secret: Secret) -> dict[str, str]:
    return {"ETag": f'"{secret.version}"'}


@route(bp, "/orgs/<org>/secrets", "GET", query=ListQuery, response=SecretList, tags=TAGS, errors=[401, 404])
def list_secrets(org: str, query: ListQuery) -> SecretList:
    """List the org's secrets (metadata only, never values)."""
    access = access_of(session(), current_user(), org)
    page = secrets.list_secrets(session(), access.org, limit=query.limit, cursor=query.cursor)
    users = secrets.used_by(session(), access.org.id, [s.id for s in page.items])
    return SecretList(items=[secret_out(s, users.get(s.id, [])) for s in page.items], next_cursor=page.next_cursor)


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
)
def create_secret(org: str, body: SecretCreate) -> Result:
    """Create a secret (org admin). The value is sealed at once and never returned."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    secret = secrets.create_secret(
        session(),
        request_context(),
        access.org,
        _keys(),
        name=body.name,
        value=body.value,
        description=body.description,
        allowed_hosts=body.allowed_hosts,
    )
    return Result(secret_out(secret, []), 201, _etag(secret))


@route(bp, "/orgs/<org>/secrets/<secret_id>", "GET", response=SecretOut, tags=TAGS, errors=[401, 404])
def get_secret(org: str, secret_id: str) -> Result:
    """Get a secret's metadata; the ETag is its version."""
    access = access_of(session(), current_user(), org)
    secret = secrets.get_secret(session(), access.org, secret_id)
    users = secrets.used_by(session(), access.org.id, [secret.id]).get(secret.id, [])
    return Result(secret_out(secret, users), headers=_etag(secret))


@route(
    bp,
    "/orgs/<org>/secrets/<secret_id>",
    "PATCH",
    body=SecretUpdate,
    response=SecretOut,
    tags=TAGS,
    errors=[401, 403, 404, 409, 412, 422],
    headers=["If-Match"],
)
def update_secret(org: str, secret_id: str, body: SecretUpdate) -> Result:
    """Edit a secret (org admin); a new value bumps the version. Honours If-Match."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    secret = secrets.update_secret(
        session(),
        request_context(),
        access.org,
        _keys(),
        secret_id,
        changes,
        if_match=secrets.parse_if_match(request.headers.get("If-Match")),
    )
    users = secrets.used_by(session(), access.org.id, [secret.id]).get(secret.id, [])
    return Result(secret_out(secret, users), headers=_etag(secret))


@route(bp, "/orgs/<org>/secrets/<secret_id>", "DELETE", status=204, tags=TAGS, errors=[401, 403, 404, 409])
def delete_secret(org: str, secret_id: str) -> None:
    """Delete a secret (org admin); refused with 409 while anything references it."""
    access = access_of(session(), current_user(), org)
    access.require_admin()
    secrets.delete_secret(session(), request_context(), access.org, secret_id)


# A revealed value must not be kept by any cache, shared or private, old or new.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _retry_after(seconds: int) -> None:
    @after_this_request
    def add_header(resp: Response) -> Response:
        resp.headers["Retry-After"] = str(seconds)
        return resp


def reveal_now(org: Org, secret_id: str) -> reveals.RevealResult:
    """Reveal for this request (API and UI): the worker round trip with this app's settings."""
    settings = current_app.config["LATCHKEY_SETTINGS"]
    return reveals.reveal(
        session(),
        request_context(),
        org,
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
)
def reveal_secret(org: str, secret_id: str) -> Result:
    """Reveal a secret's current value (org admin; audited, rate-limited, never cached).

    A worker resolves the value and seals it to a key that exists only for this request;
    503 ``worker_unavailable`` when no worker answers in time, 429 ``rate_limited`` with
    ``Retry-After`` over the per-user limit or a limit the worker enforces itself (per user,
    org, instance), 403 ``reveal_disabled`` when the workers' configuration turns reveal off.
    """
    access = access_of(session(), current_user(), org)
    access.require_admin()
    try:
        revealed = reveal_now(access.org, secret_id)
    except RateLimitedError as exc:
        _retry_after(int(exc.extra.get("retry_after", reveals.RATE_WINDOW_SECONDS)))
        raise
    return Result(SecretRevealed(value=revealed.value, version=revealed.version), headers=dict(NO_STORE))
