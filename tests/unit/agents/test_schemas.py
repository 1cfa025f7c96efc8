"""The agent and run input models hold the field rules: the API body and the UI form get the same answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from app.agents.schemas import AgentCreate, AgentUpdate, RunCreate
from app.schemas import field_errors


def _refusals(model: Any, body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps(body), strict=True)
    return [(e.field, e.message) for e in field_errors(info.value)]


@pytest.mark.parametrize(
    ("model", "body", "expected"),
    [
        (AgentCreate, {"name": " ", "provider_id": "p"}, [("name", "must be 1 to 200 characters")]),
        (
            AgentCreate,
            {"name": "A", "provider_id": ""},
            [("provider_id", "is required: the id of a provider of this org")],
        ),
        (
            AgentCreate,
            {"name": "A", "provider_id": "p", "system_prompt": "a\x00"},
            [("system_prompt", "must be text of 0 to 20000 characters")],
        ),
        (AgentUpdate, {}, [("body", "give at least one field to change")]),
        (AgentUpdate, {"name": None}, [("name", "must be 1 to 200 characters")]),
        (AgentUpdate, {"provider_id": None}, [("provider_id", "is required: the id of a provider of this org")]),
        (RunCreate, {"input": "  "}, [("input", "must be text of 1 to 32000 characters")]),
    ],
    ids=["blank-name", "no-provider", "nul-prompt", "empty-patch", "null-name", "null-provider", "blank-input"],
)
def test_refusals_name_the_field_with_the_rule_message(model: Any, body: dict[str, Any], expected: Any) -> None:
    assert _refusals(model, body) == expected


def test_an_empty_model_override_means_none_and_nulls_clear_optional_fields() -> None:
    data = AgentCreate.model_validate({"name": " A ", "provider_id": "p", "model_id": ""})
    assert (data.name, data.model_id) == ("A", None)
    patch = AgentUpdate.model_validate({"system_prompt": None, "tools": None})
    assert patch.model_dump(exclude_unset=True) == {"system_prompt": None, "tools": None}
