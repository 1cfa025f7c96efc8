"""Provider catalog pages: list (any member); create, edit, delete (org admin)."""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, render_template, request, url_for

from app.access import OrgAccess
from app.api.request import request_context
from app.errors import ConflictError, ValidationFailedError
from app.models import Provider
from app.providers import catalog
from app.providers import service as providers
from app.providers.schemas import ProviderCreate, ProviderUpdate
from app.schemas import validated
from app.secrets import service as secrets
from app.web.forms import form_errors
from app.web.pages import db, page

FIELDS = ("name", "provider_type", "kind", "model_id", "base_url", "account_id", "gateway_id", "secret_ref")
CONFIG_FIELDS = ("base_url", "account_id", "gateway_id")
# Which inputs each type shows (the service decides what is required; this only hides noise).
SHOWN_FOR = {
    "kind": [t for t in catalog.PROVIDER_TYPES if t not in catalog.FIXED_KIND],
    **{key: [t for t, (allowed, _req) in catalog.CONFIG_KEYS.items() if key in allowed] for key in CONFIG_FIELDS},
}


def _form() -> dict[str, str]:
    return {name: request.form.get(name, "").strip() for name in FIELDS}


def _values(form: dict[str, str]) -> dict[str, Any]:
    """The form's flat inputs as the model's fields: config holds the settings of the chosen type."""
    ptype = form["provider_type"]
    allowed = catalog.CONFIG_KEYS.get(ptype, (set(CONFIG_FIELDS), set()))[0]
    return {
        "name": form["name"],
        "provider_type": ptype,
        "model_id": form["model_id"],
        "config": {key: form[key] for key in CONFIG_FIELDS if key in allowed and form[key]},
        "secret_ref": form["secret_ref"],
        # Fixed-kind types bring their own kind; a leftover value from another type is ignored.
        "kind": None if ptype in catalog.FIXED_KIND else form["kind"],
    }


def _render(provider: Provider | None, form: dict[str, str], errors: dict[str, str], access: OrgAccess) -> str:
    options = secrets.list_secrets(db(), access, limit=200, cursor=None).items
    return render_template(
        "providers/form.html",
        provider=provider,
        form=form,
        errors=errors,
        secret_options=options,
        provider_types=catalog.PROVIDER_TYPES,
        shown_for=SHOWN_FOR,
    )


def _form_of(provider: Provider) -> dict[str, str]:
    return {
        "name": provider.name,
        "provider_type": provider.provider_type,
        "kind": provider.kind,
        "model_id": provider.model_id,
        "secret_ref": provider.secret_ref,
        **{k: str(provider.config.get(k, "")) for k in CONFIG_FIELDS},
    }


def _refused(exc: ValidationFailedError | ConflictError) -> dict[str, str]:
    if isinstance(exc, ValidationFailedError):
        return form_errors(exc, FIELDS, {"config": "base_url"})
    # A plain conflict on create/edit is a taken name; anything else belongs to no one field.
    return {"name": exc.detail} if exc.code == "conflict" else {"_general": exc.detail}


@page("/orgs/<org>/providers", org_role="member")
def list_providers(access: OrgAccess) -> str:
    """The org's provider catalog."""
    items = providers.list_providers(db(), access, limit=200, cursor=None).items
    names = {s.id: s.name for s in secrets.list_secrets(db(), access, limit=200, cursor=None).items}
    return render_template("providers/list.html", items=items, secret_names=names)


@page("/orgs/<org>/providers/new", ["GET", "POST"], org_role="admin")
def new_provider(access: OrgAccess) -> Any:
    """Add a provider (org admin)."""
    if request.method == "GET":
        return _render(None, {"provider_type": "openai"}, {}, access)
    form = _form()
    try:
        data = validated(ProviderCreate, _values(form), blank_is_none=("kind",))
        provider = providers.create_provider(db(), request_context(), access, data)
    except (ValidationFailedError, ConflictError) as exc:
        db().rollback()
        return _render(None, form, _refused(exc), access), exc.status
    flash(f"Provider {provider.name} added.", "success")
    return redirect(url_for("web.list_providers", org=access.org.slug))


@page("/orgs/<org>/providers/<provider_id>", ["GET", "POST"], org_role="member")
def provider_detail(access: OrgAccess, provider_id: str) -> Any:
    """A provider; admins edit it here."""
    provider = providers.get_provider(db(), access, provider_id)
    if request.method == "GET":
        return _render(provider, _form_of(provider), {}, access)
    # Editing is for admins (the service says so too): refused before the form is even read.
    access.require_admin()
    form = _form()
    try:
        data = validated(ProviderUpdate, _values(form), blank_is_none=("kind",))
        provider = providers.update_provider(db(), request_context(), access, provider_id, data)
    except (ValidationFailedError, ConflictError) as exc:
        db().rollback()
        provider = providers.get_provider(db(), access, provider_id)
        return _render(provider, form, _refused(exc), access), exc.status
    flash(f"Provider {provider.name} saved.", "success")
    return redirect(url_for("web.list_providers", org=access.org.slug))


@page("/orgs/<org>/providers/<provider_id>/delete", ["POST"], org_role="admin")
def delete_provider(access: OrgAccess, provider_id: str) -> Any:
    """Delete a provider no agent uses (org admin)."""
    try:
        providers.delete_provider(db(), request_context(), access, provider_id)
    except ConflictError as exc:
        db().rollback()
        users = ", ".join(u["name"] for u in exc.extra.get("used_by", []))
        provider = providers.get_provider(db(), access, provider_id)
        errors = {"_general": f"{exc.detail}: {users}. Change or delete those agents first."}
        return _render(provider, _form_of(provider), errors, access), exc.status
    flash("Provider deleted.", "success")
    return redirect(url_for("web.list_providers", org=access.org.slug))
