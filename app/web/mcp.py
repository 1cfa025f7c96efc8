"""MCP server pages: list, add and edit (secret picker, new secret, credential headers), live status, tools."""

from __future__ import annotations

import re
from typing import Any

from flask import flash, redirect, render_template, request, url_for

from app.access import OrgAccess
from app.api.request import request_context
from app.errors import ConflictError, FieldError, ValidationFailedError
from app.mcp import catalog, connections
from app.mcp import service as mcp
from app.mcp.schemas import McpServerCreate, McpServerUpdate
from app.models import McpServer, McpServerStatus
from app.schemas import validated
from app.secrets import service as secrets
from app.secrets.schemas import SecretCreate
from app.web.forms import form_errors
from app.web.pages import db, page
from app.web.secrets import public_keys

FIELDS = ("name", "url", "transport", "auth", "secret_ref", "new_secret_name", "new_secret_value")
# The form's authentication choices (client credentials are configured through the API).
AUTH_CHOICES = (
    ("static", "A secret or credential headers (or nothing)"),
    ("oauth:org", "OAuth: one connection for the org, made by an admin"),
    ("oauth:user", "OAuth: each member connects their own account"),
)
NEW_SECRET = "__new__"  # noqa: S105 - the picker option for "create a new secret", not a secret
# Statuses that will change on their own: the status fragment keeps polling while in one.
PENDING = (McpServerStatus.PENDING, McpServerStatus.VALIDATING)
# The header editor's rows: headers-<i>-name, headers-<i>-template, headers-<i>-secret_ref (i need not be dense:
# the browser removes rows). More rows than this are not read; the service refuses more than MAX_HEADERS anyway.
HEADER_FIELD = re.compile(r"headers-(\d{1,2})-(name|template|secret_ref)")
HEADER_PARTS = ("name", "template", "secret_ref")


def _header_rows() -> list[dict[str, str]]:
    """The header editor's rows as submitted, in order; a row without a name and a secret is left out (blank)."""
    rows: dict[int, dict[str, str]] = {}
    for key, value in request.form.items():
        match = HEADER_FIELD.fullmatch(key)
        if match:
            rows.setdefault(int(match[1]), {"idx": match[1]})[match[2]] = value.strip()
    kept = []
    for idx in sorted(rows):
        row = {part: rows[idx].get(part, "") for part in HEADER_PARTS} | {"idx": str(idx)}
        if row["name"] or row["secret_ref"]:
            kept.append(row)
    return kept


def _rows_of(server: McpServer | None) -> list[dict[str, str]]:
    if server is None:
        return []
    return [
        {"idx": str(i), "name": h.name, "template": h.template, "secret_ref": h.secret_ref}
        for i, h in enumerate(server.headers)
    ]


def _header_errors(exc: ValidationFailedError, rows: list[dict[str, str]]) -> dict[str, str]:
    """``headers.<k>.<part>`` (k: the k-th submitted row) as the message next to that row's field."""
    out: dict[str, str] = {}
    for e in exc.errors:
        parts = e.field.split(".")
        if parts[0] != "headers":
            continue
        if len(parts) >= 3 and parts[1].isdigit() and int(parts[1]) < len(rows) and parts[2] in HEADER_PARTS:
            out.setdefault(f"headers-{rows[int(parts[1])]['idx']}-{parts[2]}", e.message)
        else:
            out.setdefault("headers", e.message)
    return out


def _form() -> dict[str, str]:
    # The new secret's value is never echoed back into a page.
    return {name: request.form.get(name, "").strip() for name in FIELDS if name != "new_secret_value"}


def _render(
    access: OrgAccess,
    server: McpServer | None,
    form: dict[str, str],
    errors: dict[str, str],
    template: str,
    header_rows: list[dict[str, str]] | None = None,
) -> str:
    tools = mcp.list_tools(db(), access, server.id) if server is not None else []
    rows = _rows_of(server) if header_rows is None else header_rows
    return render_template(
        template,
        server=server,
        tools=tools,
        form=form,
        errors=errors,
        header_rows=rows,
        next_header_idx=max((int(r["idx"]) for r in rows), default=-1) + 1,
        placeholder=catalog.PLACEHOLDER,
        max_headers=catalog.MAX_HEADERS,
        secret_options=secrets.list_secrets(db(), access, limit=200, cursor=None).items,
        transports=catalog.TRANSPORTS,
        auth_choices=AUTH_CHOICES,
        new_secret=NEW_SECRET,
        pending=PENDING,
        connection=connections.for_caller(db(), request_context(), [server]).get(server.id) if server else None,
    )


def _secret_ref(access: OrgAccess, form: dict[str, str]) -> str | None:
    """The chosen secret, or a new one created in the same unit of work (org admin)."""
    choice = form.get("secret_ref") or None
    if choice != NEW_SECRET:
        return choice
    access.require_admin()
    try:
        new = {"name": form.get("new_secret_name", ""), "value": request.form.get("new_secret_value", "")}
        secret = secrets.create_secret(db(), request_context(), access, public_keys(), validated(SecretCreate, new))
    except ValidationFailedError as exc:
        # The new secret's fields are named new_secret_* on this form.
        raise ValidationFailedError(
            [
                FieldError(f"new_secret_{e.field}" if e.field in ("name", "value") else e.field, e.message)
                for e in exc.errors
            ]
        ) from None
    except ConflictError as exc:
        raise ValidationFailedError.single("new_secret_name", exc.detail) from None
    return secret.id


def _refused(exc: ValidationFailedError | ConflictError, rows: list[dict[str, str]]) -> dict[str, str]:
    if isinstance(exc, ConflictError):
        return {"_general": exc.detail}
    others = [e for e in exc.errors if e.field.split(".")[0] != "headers"]
    errors = form_errors(ValidationFailedError(others), FIELDS) if others else {}
    return errors | _header_errors(exc, rows)


def _headers(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{part: row[part] for part in HEADER_PARTS} for row in rows]


@page("/orgs/<org>/mcp-servers", org_role="member")
def list_mcp_servers(access: OrgAccess) -> str:
    """The org's MCP servers with their validation status."""
    items = mcp.list_servers(db(), access, limit=200, cursor=None).items
    return render_template("mcp/list.html", items=items)


@page("/orgs/<org>/mcp-servers/new", ["GET", "POST"], org_role="member")
def new_mcp_server(access: OrgAccess) -> Any:
    """Add an MCP server (binding a secret needs an org admin) and queue its validation."""
    if request.method == "GET":
        return _render(access, None, {"transport": "streamable_http"}, {}, "mcp/form.html")
    form = _form()
    rows = _header_rows() if access.is_admin else []  # members' form has no header editor
    try:
        values: dict[str, Any] = {"name": form["name"], "url": form["url"], "transport": form["transport"]}
        auth = _auth_value(form)
        if auth is not None and auth["type"] != "none":
            values["auth"] = auth
        ref = _secret_ref(access, form)
        if ref is not None:
            values["secret_ref"] = ref
        if rows:
            values["headers"] = _headers(rows)
        server, _job = mcp.create_server(db(), request_context(), access, validated(McpServerCreate, values))
    except (ValidationFailedError, ConflictError) as exc:
        db().rollback()
        return _render(access, None, form, _refused(exc, rows), "mcp/form.html", rows), (exc.status)
    flash(f"MCP server {server.name} added; validating it now.", "success")
    return redirect(url_for("web.mcp_server_detail", org=access.org.slug, server_id=server.id))


def _auth_choice(server: McpServer) -> str:
    if server.auth_type == "oauth":
        return f"oauth:{server.connection_scope}"
    return "static" if server.auth_type == "static" else server.auth_type


def _auth_value(form: dict[str, str]) -> dict[str, Any] | None:
    """The ``auth`` the form asks for; None keeps what the server has (e.g. client credentials)."""
    choice = form.get("auth", "static")
    if choice == "static":
        return {"type": "none"}
    if choice in ("oauth:org", "oauth:user"):
        return {"type": "oauth", "scope": choice.removeprefix("oauth:")}
    return None


def _form_of(server: McpServer) -> dict[str, str]:
    return {
        "name": server.name,
        "url": server.url,
        "transport": server.transport,
        "auth": _auth_choice(server),
        "secret_ref": server.secret_ref or "",
    }


@page("/orgs/<org>/mcp-servers/<server_id>", ["GET", "POST"], org_role="member")
def mcp_server_detail(access: OrgAccess, server_id: str) -> Any:
    """A server: live status, its tools, and the edit form."""
    server = mcp.get_server(db(), access, server_id)
    if request.method == "GET":
        return _render(access, server, _form_of(server), {}, "mcp/detail.html")
    form = _form()
    rows = _header_rows() if access.is_admin else []
    try:
        values: dict[str, Any] = {"name": form["name"], "url": form["url"], "transport": form["transport"]}
        auth = _auth_value(form)
        if auth is not None and _auth_choice(server) != form.get("auth"):
            values["auth"] = auth
        if access.is_admin:  # members cannot bind secrets; their form has no picker and no header editor
            values["secret_ref"] = _secret_ref(access, form)
            values["headers"] = _headers(rows)
        data = validated(McpServerUpdate, values)
        server, job = mcp.update_server(db(), request_context(), access, server_id, data)
    except (ValidationFailedError, ConflictError) as exc:
        db().rollback()
        server = mcp.get_server(db(), access, server_id)
        errors = _refused(exc, rows)
        return _render(access, server, form, errors, "mcp/detail.html", rows if access.is_admin else None), exc.status
    flash("Saved; validating it again." if job else "Saved.", "success")
    return redirect(url_for("web.mcp_server_detail", org=access.org.slug, server_id=server.id))


@page("/orgs/<org>/mcp-servers/<server_id>/status", org_role="member")
def mcp_server_status(access: OrgAccess, server_id: str) -> str:
    """The status badge and tool list (a fragment the page polls while validation runs)."""
    server = mcp.get_server(db(), access, server_id)
    return render_template(
        "mcp/_status.html", server=server, tools=mcp.list_tools(db(), access, server.id), pending=PENDING
    )


@page("/orgs/<org>/mcp-servers/<server_id>/validate", ["POST"], org_role="member")
def validate_mcp_server(access: OrgAccess, server_id: str) -> Any:
    """Queue a validation (any member)."""
    mcp.request_validation(db(), request_context(), access, server_id)
    flash("Validation queued.", "info")
    return redirect(url_for("web.mcp_server_detail", org=access.org.slug, server_id=server_id))


@page("/orgs/<org>/mcp-servers/<server_id>/delete", ["POST"], org_role="member")
def delete_mcp_server(access: OrgAccess, server_id: str) -> Any:
    """Delete a server (org admin when a secret is bound)."""
    mcp.delete_server(db(), request_context(), access, server_id)
    flash("MCP server deleted.", "success")
    return redirect(url_for("web.list_mcp_servers", org=access.org.slug))
