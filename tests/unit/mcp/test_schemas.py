"""The MCP server input models hold the field rules: the API body and the UI form get the same answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from app.mcp.schemas import McpServerCreate, McpServerUpdate
from app.schemas import field_errors

BASE = {"name": "S", "url": "https://mcp.example/mcp"}


def _refusals(model: Any, body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps(body), strict=True)
    return [(e.field, e.message) for e in field_errors(info.value)]


@pytest.mark.parametrize(
    ("model", "body", "expected"),
    [
        (McpServerCreate, {**BASE, "name": "\t"}, [("name", "must be 1 to 200 characters")]),
        (
            McpServerCreate,
            {**BASE, "url": "https://mcp.example/mcp?token=abc"},
            [("url", "must not carry a credential in its query (e.g. ?token=); bind a secret instead")],
        ),
        (McpServerCreate, {**BASE, "url": "ftp://mcp.example/"}, [("url", "must be an http(s) URL with a host")]),
        (McpServerUpdate, {}, [("body", "give at least one of name, url, transport, secret_ref, headers, auth")]),
        (McpServerUpdate, {"url": None}, [("url", "must be a URL of at most 2000 characters")]),
        (McpServerUpdate, {"transport": None}, [("transport", "must be 'streamable_http' or 'sse'")]),
    ],
    ids=["blank-name", "credential-query", "scheme", "empty-patch", "null-url", "null-transport"],
)
def test_refusals_name_the_field_with_the_rule_message(model: Any, body: dict[str, Any], expected: Any) -> None:
    assert _refusals(model, body) == expected


def test_a_query_without_credentials_is_kept_and_a_null_secret_unbinds() -> None:
    data = McpServerCreate.model_validate({**BASE, "url": " https://mcp.example/sse?session=1 "})
    assert (data.url, data.transport) == ("https://mcp.example/sse?session=1", "streamable_http")
    assert McpServerUpdate.model_validate({"secret_ref": None}).model_dump(exclude_unset=True) == {"secret_ref": None}
