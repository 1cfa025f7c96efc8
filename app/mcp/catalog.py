"""What an MCP server record may hold: its transports, limits and its one URL rule.

The transports are the ones ``app.mcp.client`` speaks; ``app.mcp.schemas`` builds the API
bodies and UI forms from these rules.
"""

from __future__ import annotations

from typing import Final

from app.egress.urls import DESTINATION_URL, UrlError
from app.mcp.client import TRANSPORTS
from app.schemas import refuse, trimmed_name

__all__ = ["MAX_NAME", "MAX_URL", "TRANSPORTS", "TRANSPORT_PATTERN", "name", "transport", "url"]

MAX_URL: Final = DESTINATION_URL.max_length
MAX_NAME: Final = 200
TRANSPORT_PATTERN: Final = "^(" + "|".join(TRANSPORTS) + ")$"

name = trimmed_name(MAX_NAME)


def url(value: str | None) -> str:
    """An http(s) URL with a host; no userinfo, #fragment or credential-named query parameter
    (``app.egress.urls``; the egress guard refuses those again at send time)."""
    try:
        return DESTINATION_URL.check(value)
    except UrlError as exc:
        raise refuse(str(exc)) from None


def transport(value: str | None) -> str:
    if value not in TRANSPORTS:
        raise refuse("must be " + " or ".join(repr(t) for t in TRANSPORTS))
    return value
