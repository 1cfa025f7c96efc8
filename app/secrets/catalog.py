"""The rules of a managed secret's fields: names, values, descriptions, allowed hosts.

One home for each: the input models (``app.secrets.schemas``) apply them, the backfill reuses
the name rule and the hint, and nothing else restates a limit.
"""

from __future__ import annotations

import ipaddress
import re

from app.egress.urls import split_host_pattern

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = "must start with a letter or underscore and use only letters, digits, '_', '.', '-' (max 128)"
MAX_VALUE_BYTES = 64 * 1024
MAX_DESCRIPTION = 1000
MAX_ALLOWED_HOSTS = 32
HINT_MIN_LENGTH = 20
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
_HOST_SHAPE = "must be a host like 'api.example.com', a pattern like '*.example.com', or either with ':port'"


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValueError(NAME_RULE)
    return name


def check_value(value: str) -> str:
    """Non-empty UTF-8 text of at most :data:`MAX_VALUE_BYTES` bytes."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text") from None
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"must be at most {MAX_VALUE_BYTES} bytes of UTF-8")
    return value


def check_description(description: str) -> str:
    if "\x00" in description:
        raise ValueError(f"must be text of at most {MAX_DESCRIPTION} characters, without NUL")
    return description


def normalize_host(host: str) -> str:
    """An exact host name, a ``*.suffix`` pattern or an IP literal (IPv6 in brackets), each optionally
    pinned to a ``:port``; lowercased and canonical. An entry without a port allows only the
    scheme's default port (``app.egress.guard.host_matches``). ValueError (a UrlError) otherwise."""
    name, port = split_host_pattern(host.strip().lower())
    if name.startswith("[") or ":" in name:
        try:
            address = ipaddress.IPv6Address(name.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(_HOST_SHAPE) from None
        norm = f"[{address.compressed}]"
    else:
        norm = name.rstrip(".")
        if len(norm) > 253 or not HOST_RE.fullmatch(norm):
            raise ValueError(_HOST_SHAPE)
    return norm if port is None else f"{norm}:{port}"


def distinct(hosts: list[str]) -> list[str]:
    """The normalized entries once each, in their first order."""
    return list(dict.fromkeys(hosts))


def value_hint(value: str) -> str | None:
    """The last 4 characters, only for values long enough that this reveals little."""
    return value[-4:] if len(value) >= HINT_MIN_LENGTH else None
