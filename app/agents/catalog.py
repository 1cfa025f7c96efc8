"""What an agent and a run may hold: the limits and field rules of their inputs, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from app.providers.catalog import MAX_MODEL
from app.schemas import refuse, trimmed_name

MAX_NAME: Final = 200
MAX_PROMPT: Final = 20_000
MAX_INPUT: Final = 32_000
MAX_TOOLS: Final = 64
# An agent's model_id overrides its provider's: the provider catalog's limit.
__all__ = ["MAX_INPUT", "MAX_MODEL", "MAX_NAME", "MAX_PROMPT", "MAX_TOOLS"]

name = trimmed_name(MAX_NAME)


def provider_id(value: str | None) -> str:
    if not value:
        raise refuse("is required: the id of a provider of this org")
    return value


def text(limit: int) -> Callable[[str | None], str | None]:
    """Optional free text: at most ``limit`` characters, no NUL."""

    def check(value: str | None) -> str | None:
        if value is not None and (len(value) > limit or "\x00" in value):
            raise refuse(f"must be text of 0 to {limit} characters")
        return value

    return check


def model_id(value: str | None) -> str | None:
    """An override of the provider's model; empty means none."""
    return text(MAX_MODEL)(value) or None


system_prompt = text(MAX_PROMPT)


def run_input(value: str) -> str:
    if not value.strip() or len(value) > MAX_INPUT or "\x00" in value:
        raise refuse(f"must be text of 1 to {MAX_INPUT} characters")
    return value
