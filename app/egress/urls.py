"""Destination URLs and host patterns: the one set of rules the API's validators and the guard share.

``check_http_url`` is what every stored destination URL must pass (an MCP server's ``url``, a
provider's ``config.base_url``, the gateway base URL): it never raises anything but
``UrlError``, whose message is a fixed phrase of ours (never the URL: its query may hold a
token). A :class:`UrlRule` fixes its options once per kind of URL: :data:`DESTINATION_URL` for
an endpoint used as given, :data:`BASE_URL` for a prefix that paths are appended to. The
egress guard applies ``credential_query_names`` again at send time, so a URL that reached the
database some other way is still refused before it carries a secret.

``split_host_pattern`` reads an ``allowed_hosts`` entry: ``host``, ``*.suffix``, an IP literal
(IPv6 in brackets), each optionally with ``:port``. An entry without a port matches only the
scheme's default port (443 for https, 80 for http).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import SplitResult, parse_qsl, urlsplit

import httpx2

# Query parameter names that carry a credential, compared case-insensitively with '-' read as
# '_': a URL with one is refused like a URL with userinfo (bind a secret instead). Also every name
# ending in one of CREDENTIAL_QUERY_SUFFIXES (``github_token``, ``private_key``, ``client_secret``).
CREDENTIAL_QUERY_NAMES: Final = frozenset(
    {
        "access_token",
        "api_key",
        "apikey",
        "auth",
        "authorization",
        "bearer",
        "client_secret",
        "code",
        "credential",
        "credentials",
        "id_token",
        "jwt",
        "key",
        "pass",
        "passwd",
        "password",
        "pwd",
        "refresh_token",
        "secret",
        "session_token",
        "sig",
        "signature",
        "token",
        "x_amz_credential",
        "x_amz_security_token",
        "x_amz_signature",
        "x_goog_credential",
        "x_goog_signature",
    }
)
CREDENTIAL_QUERY_SUFFIXES: Final = ("_token", "_key", "_secret", "_password", "_apikey", "_signature")

SCHEMES: Final = ("http", "https")
DEFAULT_PORTS: Final = {"https": 443, "http": 80}
_PORT_RE = re.compile(r"^[0-9]{1,5}$")


class UrlError(ValueError):
    """A destination URL or host pattern is unusable; the message never quotes it."""


def is_credential_name(name: str) -> bool:
    norm = name.strip().lower().replace("-", "_")
    return norm in CREDENTIAL_QUERY_NAMES or norm.endswith(CREDENTIAL_QUERY_SUFFIXES)


def credential_query_names(query: str) -> list[str]:
    """The parameter names of ``query`` that look like credentials (decoded, as a server reads them)."""
    # Some servers also split on ';' (the older form-encoding rule): read both ways.
    try:
        pairs = parse_qsl(query, keep_blank_values=True) + parse_qsl(query, keep_blank_values=True, separator=";")
        names = {name for pair in pairs for name in pair[0].split("&")}
    except ValueError:
        return ["?"]
    return sorted(name for name in names if is_credential_name(name))


def _split(text: str) -> SplitResult:
    try:
        parts = urlsplit(text)
        # hostname and port parse lazily and raise ValueError ("[::1", port 99999, "h:x").
        _ = parts.hostname, parts.port
    except ValueError:
        raise UrlError("is not a valid URL") from None
    return parts


def check_http_url(value: Any, *, max_length: int = 2000, allow_query: bool = True) -> str:
    """``value`` stripped, if it is an http(s) URL with a host and nothing that carries a credential.

    Refused: not a string or too long; unparseable (by ``urllib`` or by ``httpx2``, which sends
    it); another scheme; no host; userinfo; a #fragment; a query (``allow_query=False``) or a
    query parameter named like a credential.
    """
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise UrlError(f"must be a URL of at most {max_length} characters")
    text = value.strip()
    if not text or any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise UrlError("must be a URL without spaces or control characters")
    parts = _split(text)
    try:
        sent = httpx2.URL(text)
    except (httpx2.InvalidURL, TypeError, ValueError):
        raise UrlError("is not a valid URL") from None
    if parts.scheme not in SCHEMES or sent.scheme not in SCHEMES or not parts.hostname or not sent.host:
        raise UrlError("must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None or sent.userinfo:
        raise UrlError("must not carry credentials; bind a secret instead")
    if parts.fragment or "#" in text:
        raise UrlError("must not have a #fragment")
    if parts.query or "?" in text:
        if not allow_query:
            raise UrlError("must not have a query")
        if credential_query_names(parts.query):
            raise UrlError("must not carry a credential in its query (e.g. ?token=); bind a secret instead")
    return text


@dataclass(frozen=True)
class UrlRule:
    """One kind of destination URL: :func:`check_http_url` with its options fixed."""

    max_length: int = 2000
    allow_query: bool = True
    # A base URL has paths appended ("{base}/v1/messages"): its trailing slashes are dropped.
    strip_trailing_slash: bool = False

    def check(self, value: Any) -> str:
        text = check_http_url(value, max_length=self.max_length, allow_query=self.allow_query)
        return text.rstrip("/") if self.strip_trailing_slash else text


DESTINATION_URL: Final = UrlRule()
"""An endpoint used as given (an MCP server's ``url``): a query is allowed, minus credential names."""
BASE_URL: Final = UrlRule(allow_query=False, strip_trailing_slash=True)
"""A prefix of endpoints (a provider's ``config.base_url``, the AI gateway's): no query."""


def split_host_pattern(entry: str) -> tuple[str, int | None]:
    """An ``allowed_hosts`` entry as (host pattern, port or None); UrlError when the port part is bad.

    ``api.example.com:8443`` -> ("api.example.com", 8443); ``[::1]:8443`` -> ("[::1]", 8443);
    ``::1`` (an unbracketed IPv6 literal) has no port.
    """
    text = entry.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UrlError("has an unclosed '['")
        host, rest = text[: end + 1], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise UrlError("must be '[address]' or '[address]:port'")
        return host, _port(rest[1:])
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, _port(port)
    if ":" in text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise UrlError("must put an IPv6 address in brackets, e.g. '[::1]:8443'") from None
    return text, None


def _port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) <= 65535:
        raise UrlError("must have a port from 1 to 65535")
    return int(text)
