"""The provider input models hold the field rules: the API body and the UI form get the same answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from app.errors import ValidationFailedError
from app.providers.schemas import ProviderCreate, ProviderUpdate
from app.schemas import field_errors

BASE = {"name": "P", "provider_type": "openai", "model_id": "m", "secret_ref": "s1"}


def _refusals(model: Any, body: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        model.model_validate_json(json.dumps(body), strict=True)
    except ValidationError as exc:
        return [(e.field, e.message) for e in field_errors(exc)]
    except ValidationFailedError as exc:
        return [(e.field, e.message) for e in exc.errors]
    raise AssertionError("accepted")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({**BASE, "name": "   "}, [("name", "must be 1 to 128 characters")]),
        ({**BASE, "name": "a\x00b"}, [("name", "must be 1 to 128 characters")]),
        ({**BASE, "model_id": " \t"}, [("model_id", "must be 1 to 200 printable characters")]),
        (
            {**BASE, "provider_type": "bogus"},
            [("provider_type", "must be one of openai, anthropic, openai_compatible, cloudflare_ai_gateway")],
        ),
        ({**BASE, "kind": "anthropic"}, [("kind", "must be 'openai' for provider_type 'openai'")]),
        ({**BASE, "config": {"token": "x"}}, [("config.token", "is not a setting of openai")]),
        (
            {**BASE, "config": {"base_url": "https://x.test/?a=1"}},
            [("config.base_url", "must not have a query")],
        ),
        (
            {**BASE, "provider_type": "cloudflare_ai_gateway", "kind": "openai", "config": {"account_id": "a"}},
            [("config.gateway_id", "is required for cloudflare_ai_gateway")],
        ),
    ],
    ids=["blank-name", "nul-name", "blank-model", "type", "fixed-kind", "unknown-setting", "query", "gateway-id"],
)
def test_create_refuses_on_the_field_with_the_rule_message(body: dict[str, Any], expected: list[Any]) -> None:
    assert _refusals(ProviderCreate, body) == expected


def test_create_fills_the_fixed_kind_and_cleans_the_base_url() -> None:
    data = ProviderCreate.model_validate({**BASE, "config": {"base_url": "https://proxy.test//"}})
    assert (data.name, data.kind, data.config) == ("P", "openai", {"base_url": "https://proxy.test"})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, [("body", "give at least one field to change")]),
        ({"name": None}, [("name", "must be 1 to 128 characters")]),
        ({"model_id": None}, [("model_id", "must be 1 to 200 printable characters")]),
        (
            {"provider_type": None},
            [
                (
                    "provider_type",
                    "must be one of "
                    + ", ".join(["openai", "anthropic", "openai_compatible", "cloudflare_ai_gateway"]),
                )
            ],
        ),
    ],
    ids=["empty", "null-name", "null-model", "null-type"],
)
def test_update_refuses_an_empty_body_and_nulls_of_required_fields(body: dict[str, Any], expected: list[Any]) -> None:
    assert _refusals(ProviderUpdate, body) == expected


def test_update_keeps_only_what_was_sent() -> None:
    data = ProviderUpdate.model_validate({"name": " New ", "kind": None})
    assert data.model_dump(exclude_unset=True) == {"name": "New", "kind": None}
