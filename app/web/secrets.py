"""Secrets pages: list, create, edit, delete, reveal (org admins, on click) and the audit trail."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, current_app, flash, jsonify, redirect, render_template, request, url_for

from app.access import OrgAccess
from app.api.request import request_context
from app.api.secrets import NO_STORE, reveal_now
from app.audit import service as audit
from app.audit.schemas import AuditFilter
from app.errors import (
    ConflictError,
    SecretInUseError,
    ServiceUnavailableError,
    ValidationFailedError,
    VersionMismatchError,
)
from app.models import AuditEvent
from app.schemas import validated
from app.secrets import service as secrets
from app.secrets.keyring import PublicKeySet
from app.secrets.schemas import SecretCreate, SecretOut, SecretUpdate
from app.web.forms import form_errors, int_or_none, invalid
from app.web.pages import REVEAL_HIDE_SECONDS, db, page

FIELDS = ("name", "value", "description", "allowed_hosts")
AUDIT_TRAIL_LIMIT = 50
_HOST_SPLIT = re.compile(r"[\s,]+")


def public_keys() -> PublicKeySet:
    keys: PublicKeySet | None = current_app.extensions["latchkey.public_keys"]
    if keys is None:
        raise ServiceUnavailableError("sealing keys are not configured (set LATCHKEY_PUBLIC_KEYS)")
    return keys


def split_hosts(text: str) -> list[str]:
    return [h for h in _HOST_SPLIT.split(text.strip()) if h]


def _form() -> dict[str, str]:
    # The value is never echoed back into a page, even after a refused submission.
    return {
        "name": request.form.get("name", ""),
        "description": request.form.get("description", ""),
        "allowed_hosts": request.form.get("allowed_hosts", ""),
    }


def _fields(form: dict[str, str]) -> dict[str, Any]:
    """The form as the input models take it: what a text box cannot say (none, a list) converted."""
    fields: dict[str, Any] = {
        "name": form["name"].strip(),
        "description": form["description"] or None,
        "allowed_hosts": split_hosts(form["allowed_hosts"]),
    }
    if request.form.get("value"):
        fields["value"] = request.form["value"]
    return fields


@page("/orgs/<org>/secrets", org_role="member")
def list_secrets(access: OrgAccess) -> str:
    """The org's secrets: name, version, hint, users; values are never here."""
    page_ = secrets.list_secrets(db(), access, limit=100, cursor=request.args.get("cursor") or None)
    return render_template("secrets/list.html", items=page_.items, next_cursor=page_.next_cursor)


@page("/orgs/<org>/secrets/new", ["GET", "POST"], org_role="admin")
def new_secret(access: OrgAccess) -> Any:
    """Create a secret (org admin)."""
    if request.method == "GET":
        return render_template("secrets/form.html", secret=None, form={}, errors={})
    form = _form()
    try:
        data = validated(SecretCreate, {"value": "", **_fields(form)})
        secret = secrets.create_secret(db(), request_context(), access, public_keys(), data)
    except (ValidationFailedError, ConflictError) as exc:
        errors = form_errors(exc, FIELDS) if isinstance(exc, ValidationFailedError) else {"name": exc.detail}
        return invalid("secrets/form.html", exc.status, secret=None, form=form, errors=errors)
    flash(f"Secret {secret.name} created (version 1).", "success")
    return redirect(url_for("web.secret_detail", org=access.org.slug, secret_id=secret.id))


def _audit_trail(access: OrgAccess, secret_id: str) -> list[AuditEvent]:
    if not access.is_admin:  # the audit log is for org admins, as in the API
        return []
    where = AuditFilter(target_type="secret", target_id=secret_id)
    return audit.list_events(db(), access, where, limit=AUDIT_TRAIL_LIMIT, cursor=None).items


def _detail(access: OrgAccess, secret: SecretOut, **extra: Any) -> str:
    return render_template(
        "secrets/detail.html",
        secret=secret,
        events=_audit_trail(access, secret.id),
        hide_seconds=int(current_app.config[REVEAL_HIDE_SECONDS]),
        **extra,
    )


@page("/orgs/<org>/secrets/<secret_id>", org_role="member")
def secret_detail(access: OrgAccess, secret_id: str) -> str:
    """One secret's metadata, users and (admins) reveal control and audit trail."""
    return _detail(access, secrets.get_secret(db(), access, secret_id))


@page("/orgs/<org>/secrets/<secret_id>/edit", ["GET", "POST"], org_role="admin")
def edit_secret(access: OrgAccess, secret_id: str) -> Any:
    """Edit a secret (org admin): a new value is a new version."""
    secret = secrets.get_secret(db(), access, secret_id)
    if request.method == "GET":
        form = {
            "name": secret.name,
            "description": secret.description or "",
            "allowed_hosts": ", ".join(secret.allowed_hosts),
        }
        return render_template("secrets/form.html", secret=secret, form=form, errors={})
    form = _form()
    before = secret.version
    try:
        data = validated(SecretUpdate, _fields(form))
        if_match = int_or_none(request.form.get("version"))
        secret = secrets.update_secret(
            db(), request_context(), access, public_keys(), secret_id, data, if_match=if_match
        )
    except (ValidationFailedError, ConflictError) as exc:
        errors = form_errors(exc, FIELDS) if isinstance(exc, ValidationFailedError) else {"name": exc.detail}
        return invalid("secrets/form.html", exc.status, secret=secret, form=form, errors=errors)
    except VersionMismatchError as exc:
        errors = {"_general": "Someone changed this secret while you were editing; reload and try again."}
        return invalid("secrets/form.html", exc.status, secret=secret, form=form, errors=errors)
    if secret.version != before:
        flash(f"Saved: the value is now version {secret.version}.", "success")
    else:
        flash("Saved.", "success")
    return redirect(url_for("web.secret_detail", org=access.org.slug, secret_id=secret.id))


@page("/orgs/<org>/secrets/<secret_id>/delete", ["POST"], org_role="admin")
def delete_secret(access: OrgAccess, secret_id: str) -> Any:
    """Delete a secret (org admin); refused while anything uses it, listing those users."""
    try:
        secrets.delete_secret(db(), request_context(), access, secret_id)
    except SecretInUseError as exc:
        db().rollback()
        secret = secrets.get_secret(db(), access, secret_id)
        return _detail(access, secret, blocked=exc.extra.get("used_by", [])), 409
    flash("Secret deleted.", "success")
    return redirect(url_for("web.list_secrets", org=access.org.slug))


@page("/orgs/<org>/secrets/<secret_id>/reveal", ["POST"], org_role="admin", json=True)
def reveal_secret(access: OrgAccess, secret_id: str) -> Response:
    """Reveal the current value (org admin, explicit click): JSON, never cached, audited."""
    revealed = reveal_now(access, secret_id)
    resp = jsonify({"value": revealed.value, "version": revealed.version})
    resp.headers.update(NO_STORE)
    return resp
