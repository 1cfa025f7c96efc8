"""The web UI: server-rendered pages over the same services as the API (``/``, ``/login``, ``/orgs/...``).

Pages are plain HTML forms with a CSRF token; a small vanilla script (``static/app.js``) adds
the reveal button, copy, field toggles and fragment polling. No inline script or style, so the
Content-Security-Policy can forbid both.
"""

from __future__ import annotations

from flask import Flask

# View modules register their routes on ``bp`` when imported.
from app.web import agents, auth, mcp, operator, providers, secrets  # noqa: F401
from app.web.blueprint import bp
from app.web.pages import init_app, security_headers

__all__ = ["bp", "init_app", "register", "security_headers"]


def register(app: Flask) -> None:
    """Mount the UI at ``/`` with its error pages and cookie settings."""
    app.register_blueprint(bp)
    init_app(app)
