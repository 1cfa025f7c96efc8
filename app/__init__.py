"""Latchkey: managed secrets for AI agents and MCP servers."""

from __future__ import annotations

__version__ = "0.1.0"

from app.factory import create_app

__all__ = ["__version__", "create_app"]
