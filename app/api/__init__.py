"""The JSON API (``/api/v1``): thin handlers over the services."""

from __future__ import annotations

# Route modules register themselves on ``bp`` when imported.
from app.api import agents, audit, identity, jobs, mcp, openapi, operator, providers, secrets  # noqa: F401
from app.api.blueprint import bp

__all__ = ["bp"]
