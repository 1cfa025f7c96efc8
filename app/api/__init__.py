"""The JSON API (``/api/v1``): thin handlers over the services."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")

# Route modules register themselves on ``bp`` when imported.
from app.api import agents, audit, identity, jobs, mcp, openapi, providers, secrets  # noqa: E402,F401
