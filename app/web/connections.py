"""MCP connection pages: Connect / Reconnect / Disconnect, the OAuth callback, and "My connections"."""

from __future__ import annotations

from typing import Any

import httpx2
from flask import abort, current_app, flash, jsonify, redirect, render_template, request, url_for

from app.access import OrgAccess
from app.api.request import request_context
from app.mcp import connections, oauth
from app.models import User
from app.web.blueprint import bp
from app.web.pages import db, page
from app.web.secrets import public_keys
from app.web.signin import current_user_or_none


@page("/orgs/<org>/connections", org_role="member")
def my_connections(access: OrgAccess) -> str:
    """The org's OAuth servers and the connection the caller's runs use on each."""
    rows = connections.my_connections(db(), request_context(), access)
    return render_template("mcp/connections.html", rows=rows)


@page("/orgs/<org>/mcp-servers/<server_id>/connect", ["POST"], org_role="member")
def connect_mcp_server(access: OrgAccess, server_id: str) -> Any:
    """Send the user to the authorization server (a worker prepares the URL)."""
    start = connections.connect(
        db(),
        request_context(),
        access,
        server_id,
        redis=current_app.extensions["latchkey.redis"],
        settings=current_app.config["LATCHKEY_SETTINGS"],
    )
    # Not a redirect: the CSP's form-action 'self' (rightly) blocks a form whose answer redirects to
    # another origin. The page names the authorization server and navigates there itself.
    html = render_template(
        "mcp/authorize.html", url=start.authorization_url, host=httpx2.URL(start.authorization_url).netloc.decode()
    )
    # The URL carries this authorization's state: no cache keeps it.
    return html, 200, {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@page("/orgs/<org>/mcp-servers/<server_id>/disconnect", ["POST"], org_role="member")
def disconnect_mcp_server(access: OrgAccess, server_id: str) -> Any:
    """Disconnect now; a worker revokes the tokens at the server."""
    connections.disconnect(db(), request_context(), access, server_id)
    flash("Disconnected.", "success")
    return redirect(
        request.form.get("next") or url_for("web.mcp_server_detail", org=access.org.slug, server_id=server_id)
    )


@bp.route(oauth.CLIENT_METADATA_PATH)
def client_metadata_document() -> Any:
    """This deployment's Client ID Metadata Document (public: authorization servers fetch it)."""
    public_url = current_app.config["LATCHKEY_SETTINGS"].public_url
    if not public_url:
        abort(404)
    return jsonify(oauth.client_metadata(public_url)), 200, {"Cache-Control": "public, max-age=3600"}


@page("/oauth/callback")
def oauth_callback() -> Any:
    """Where the authorization server sends the user back: the code goes, sealed, to a worker."""
    user = current_user_or_none()
    assert isinstance(user, User)  # page() signs the visitor in first
    _job, server, org = connections.complete(
        db(),
        request_context(),
        user,
        public_keys(),
        state=request.args.get("state"),
        code=request.args.get("code"),
        error=request.args.get("error"),
    )
    flash(f"Connected to {server.name}; listing its tools now.", "success")
    return redirect(url_for("web.mcp_server_detail", org=org.slug, server_id=server.id))
