"""What a provider catalog entry may be: its types, their kinds and settings, and the field rules.

The one home of these rules: ``app.providers.schemas`` builds the API bodies and UI forms from
them, the service re-checks type, kind and config together on an edited row, and the worker's
``app.agents.llm`` offers exactly these types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from app.egress.urls import BASE_URL, UrlError
from app.errors import ValidationFailedError
from app.schemas import refuse, trimmed_name

PROVIDER_TYPES: Final = ("openai", "anthropic", "openai_compatible", "cloudflare_ai_gateway")
# Types whose kind is fixed by the vendor.
FIXED_KIND: Final = {"openai": "openai", "anthropic": "anthropic"}
# Allowed config keys per type, and which of them are required.
CONFIG_KEYS: Final[dict[str, tuple[set[str], set[str]]]] = {
    "openai": ({"base_url"}, set()),
    "anthropic": ({"base_url"}, set()),
    "openai_compatible": ({"base_url"}, {"base_url"}),
    "cloudflare_ai_gateway": ({"account_id", "gateway_id"}, {"account_id", "gateway_id"}),
}
KIND_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
GATEWAY_ID_RE: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME: Final = 128
MAX_MODEL: Final = 200

name = trimmed_name(MAX_NAME)


def provider_type(value: str | None) -> str:
    if value not in PROVIDER_TYPES:
        raise refuse("must be one of " + ", ".join(PROVIDER_TYPES))
    return value


def model_id(value: str | None) -> str:
    if value is None or not value.strip() or len(value) > MAX_MODEL or not value.isprintable():
        raise refuse(f"must be 1 to {MAX_MODEL} printable characters")
    return value.strip()


class Shape(NamedTuple):
    provider_type: str
    kind: str
    config: dict[str, Any]


def shape(ptype: str, kind: str | None, config: Mapping[str, Any] | None) -> Shape:
    """Type, kind and config checked together: each type has its own kind rule and settings.

    ``ptype`` has passed :func:`provider_type`. Raises ``ValidationFailedError`` on the field
    (``kind``, ``config.<key>``): it runs on a create body and on an edited row alike.
    """
    fixed = FIXED_KIND.get(ptype)
    if fixed is not None:
        if kind not in (None, fixed):
            raise ValidationFailedError.single("kind", f"must be {fixed!r} for provider_type {ptype!r}")
        kind = fixed
    elif kind is None or not KIND_RE.fullmatch(kind):
        raise ValidationFailedError.single("kind", "lowercase letters, digits, '.', '_' or '-', e.g. 'openai'")
    config = {} if config is None else config
    allowed, required = CONFIG_KEYS[ptype]
    for key in config:
        if key not in allowed:
            raise ValidationFailedError.single(f"config.{key}", f"is not a setting of {ptype}")
    for key in sorted(required - config.keys()):
        raise ValidationFailedError.single(f"config.{key}", f"is required for {ptype}")
    clean: dict[str, Any] = {}
    if "base_url" in config:
        try:
            clean["base_url"] = BASE_URL.check(config["base_url"])
        except UrlError as exc:
            raise ValidationFailedError.single("config.base_url", str(exc)) from None
    for key in ("account_id", "gateway_id"):
        if key in config:
            if not isinstance(config[key], str) or not GATEWAY_ID_RE.fullmatch(config[key]):
                raise ValidationFailedError.single(f"config.{key}", "letters, digits, '_' or '-' (max 64)")
            clean[key] = config[key]
    return Shape(ptype, kind, clean)
