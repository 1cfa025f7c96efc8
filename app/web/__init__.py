"""The web UI: server-rendered pages over the same services as the API (``/``, ``/login``, ``/orgs/...``).

Pages are plain HTML forms with a CSRF token; a small vanilla script (``static/app.js``) adds
the reveal button, copy, field toggles and fragment polling. No inline script or style, so the
Content-Security-Policy can forbid both.
"""

from __future__ import annotations

from flask import Flask

from app import extensions

# View modules register their routes on ``bp`` when imported.
from app.web import agents, auth, connections, mcp, operator, providers, secrets  # noqa: F401
from app.web.blueprint import bp
from app.web.pages import init_app, security_headers

__all__ = ["bp", "init_app", "register", "security_headers"]


def register(app: Flask) -> None:
    """Mount the UI at ``/`` with its error pages and cookie settings, and the extensions' UI parts."""
    app.register_blueprint(bp)
    # An extension's ``web`` module may bring a blueprint (its templates) and an operator-page part.
    for module in extensions.modules("web"):
        if hasattr(module, "bp"):
            app.register_blueprint(module.bp)
    init_app(app)
