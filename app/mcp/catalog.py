"""What an MCP server record may hold: its transports, limits and its one URL rule.

The transports are the ones ``app.mcp.client`` speaks; ``app.mcp.schemas`` builds the API
bodies and UI forms from these rules. Header credentials (issue #12) follow the rules here too:
a header name is an RFC 9110 token outside the reserved set, its value a template holding
``{{secret}}`` exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from app.egress.urls import DESTINATION_URL, UrlError
from app.mcp.client import TRANSPORTS
from app.schemas import refuse, trimmed_name

__all__ = [
    "AUTH_TYPES",
    "CLIENT_AUTH_METHODS",
    "CONNECTION_AUTH_TYPES",
    "CONNECTION_SCOPES",
    "MAX_HEADERS",
    "MAX_HEADER_NAME",
    "MAX_HEADER_TEMPLATE",
    "MAX_NAME",
    "MAX_URL",
    "PLACEHOLDER",
    "TRANSPORTS",
    "TRANSPORT_PATTERN",
    "header_name",
    "header_names",
    "header_template",
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
# The auth types whose servers are called with a connection's tokens.
CONNECTION_AUTH_TYPES: Final = ("oauth", "oauth_client_credentials")
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


# Header credentials ------------------------------------------------------------------------

PLACEHOLDER: Final = "{{secret}}"
MAX_HEADERS: Final = 8
MAX_HEADER_NAME: Final = 128
MAX_HEADER_TEMPLATE: Final = 1000
# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Visible ASCII and the space; no CR, LF, NUL or other control character (RFC 9110 field-vchar).
_TEMPLATE_CHARS: Final = re.compile(r"[\x20-\x7e]*")
# Names the transport, the MCP protocol or proxies own: a credential header must not override them.
RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "cookie",
        "set-cookie",
        "accept",
        "accept-encoding",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
        "origin",
        "forwarded",
    }
)
RESERVED_PREFIXES: Final = ("proxy-", "sec-", "x-forwarded-")
BEARER_HEADER: Final = "authorization"


def header_name(value: str | None) -> str:
    """An RFC 9110 token of at most 128 characters, not one the transport or protocol owns."""
    if value is None or not _TOKEN.fullmatch(value) or len(value) > MAX_HEADER_NAME:
        raise refuse(
            f"must be a header name of 1 to {MAX_HEADER_NAME} letters, digits or !#$%&'*+-.^_`|~ (no spaces or colons)"
        )
    key = value.lower()
    if key in RESERVED_HEADERS or key.startswith(RESERVED_PREFIXES):
        raise refuse("this header is set by the HTTP client or the MCP protocol: pick another header name")
    return value


def header_template(value: str | None) -> str:
    """The header's value with the secret's place marked: ``{{secret}}`` exactly once, visible ASCII and spaces."""
    if value is None or len(value) > MAX_HEADER_TEMPLATE:
        raise refuse(f"must be at most {MAX_HEADER_TEMPLATE} characters, with {PLACEHOLDER} where the secret goes")
    if not _TEMPLATE_CHARS.fullmatch(value):
        raise refuse("may hold only visible ASCII characters and spaces (no line breaks or control characters)")
    if value.count(PLACEHOLDER) != 1:
        raise refuse(f"must contain {PLACEHOLDER} exactly once, where the secret's value goes")
    return value


def header_names(names: Sequence[str], *, bearer: bool) -> list[tuple[int, str]]:
    """What is wrong with a server's set of header names: ``[(index, message)]``, empty when none.

    At most ``MAX_HEADERS``; unique case-insensitively; no ``Authorization`` when the server
    also sends its ``secret_ref`` as the bearer token (``bearer``).
    """
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(names):
        key = value.lower()
        if key in seen:
            problems.append(
                (i, f"is the same name as header {seen[key] + 1} (header names are compared case-insensitively)")
            )
        elif bearer and key == BEARER_HEADER:
            problems.append(
                (i, "Authorization is already sent as the bearer token of secret_ref: remove secret_ref or this header")
            )
        seen.setdefault(key, i)
    return problems
