"""The API blueprint (``/api/v1``), in its own module so route modules need not import the package."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/api/v1")
