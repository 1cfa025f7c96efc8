"""What an MCP server record may hold: its transports, limits and its one URL rule.

The transports are the ones ``app.mcp.client`` speaks; ``app.mcp.schemas`` builds the API
bodies and UI forms from these rules.
"""

from __future__ import annotations

import re
from typing import Final

from app.egress.urls import DESTINATION_URL, UrlError
from app.mcp.client import TRANSPORTS
from app.schemas import refuse, trimmed_name

__all__ = [
    "AUTH_TYPES",
    "CLIENT_AUTH_METHODS",
    "CONNECTION_SCOPES",
    "MAX_NAME",
    "MAX_URL",
    "TRANSPORTS",
    "TRANSPORT_PATTERN",
    "name",
    "scopes",
    "transport",
    "url",
]

MAX_URL: Final = DESTINATION_URL.max_length
MAX_NAME: Final = 200
TRANSPORT_PATTERN: Final = "^(" + "|".join(TRANSPORTS) + ")$"

name = trimmed_name(MAX_NAME)

# How a server is authenticated, as the API shows it. "none", "bearer" (secret_ref) and "headers"
# are all stored as "static": they follow from secret_ref and headers.
AUTH_TYPES: Final = ("none", "bearer", "headers", "oauth", "oauth_client_credentials")
STORED_AUTH_TYPES: Final = ("static", "oauth", "oauth_client_credentials")
CONNECTION_SCOPES: Final = ("org", "user")
CLIENT_AUTH_METHODS: Final = ("none", "client_secret_basic", "client_secret_post", "private_key_jwt")
MAX_SCOPES: Final = 32
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 §3.3 scope-token
_CLIENT_ID_RE = re.compile(r"[\x21-\x7e]{1,255}")


def scopes(value: list[str] | None) -> list[str] | None:
    """OAuth scope tokens (RFC 6749 §3.3), each once; at most 32."""
    if value is None:
        return None
    if len(value) > MAX_SCOPES:
        raise refuse(f"at most {MAX_SCOPES} scopes")
    seen: list[str] = []
    for scope in value:
        if not _SCOPE_RE.fullmatch(scope):
            raise refuse("each scope must be 1-128 visible ASCII characters without spaces, quotes or backslashes")
        if scope not in seen:
            seen.append(scope)
    return seen


def client_id(value: str | None) -> str | None:
    if value is not None and not _CLIENT_ID_RE.fullmatch(value):
        raise refuse("must be 1-255 visible ASCII characters")
    return value


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
