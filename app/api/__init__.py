"""The JSON API (``/api/v1``): thin handlers over the services."""

from __future__ import annotations

from app import extensions

# Route modules register themselves on ``bp`` when imported; so do the extensions' (app/extensions.py).
from app.api import agents, audit, identity, jobs, mcp, openapi, operator, providers, secrets  # noqa: F401
from app.api.blueprint import bp

extensions.modules("api")

__all__ = ["bp"]
