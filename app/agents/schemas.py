"""Agent and run inputs (API bodies and UI forms alike) and outputs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, computed_field

from app.agents import catalog
from app.schemas import Patch, Strict

Name = Annotated[str, Field(min_length=1, max_length=catalog.MAX_NAME), AfterValidator(catalog.name)]
ModelId = Annotated[
    str | None,
    Field(max_length=catalog.MAX_MODEL, description="Overrides the provider's model."),
    AfterValidator(catalog.model_id),
]
SystemPrompt = Annotated[str | None, Field(max_length=catalog.MAX_PROMPT), AfterValidator(catalog.system_prompt)]


class ToolRef(Strict):
    model_config = ConfigDict(from_attributes=True)

    mcp_server_id: str
    tool_name: str


Tools = Annotated[list[ToolRef] | None, Field(max_length=catalog.MAX_TOOLS)]


class AgentCreate(Strict):
    name: Name
    provider_id: Annotated[
        str, Field(description="A provider of this org (required)."), AfterValidator(catalog.provider_id)
    ]
    model_id: ModelId = None
    system_prompt: SystemPrompt = None
    tools: Tools = None


class AgentUpdate(Patch):
    """The fields to change (tools: the whole new selection)."""

    # An explicit null is refused by the field's own rule where the field cannot be empty.
    name: Annotated[Name | None, AfterValidator(catalog.name)] = None
    provider_id: Annotated[str | None, AfterValidator(catalog.provider_id)] = None
    model_id: ModelId = None
    system_prompt: SystemPrompt = None
    tools: Tools = None


class AgentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    provider_id: str
    model_id: str | None
    system_prompt: str | None
    tools: list[ToolRef]
    created_at: datetime
    updated_at: datetime


class AgentList(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    items: list[AgentOut]
    next_cursor: str | None


class RunCreate(Strict):
    input: Annotated[str, Field(min_length=1, max_length=catalog.MAX_INPUT), AfterValidator(catalog.run_input)]


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    agent_id: str
    status: str = Field(description="queued | running | succeeded | failed")
    input: str
    output: str | None
    events: Annotated[list[dict[str, Any]], BeforeValidator(lambda v: v or [])] = Field(
        description="Ordered: status, tool_call, tool_result, tool_error, final, error."
    )
    usage: dict[str, Any] | None
    error_code: str | None = Field(exclude=True)
    error_message: str | None = Field(exclude=True)
    created_at: datetime
    finished_at: datetime | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def error(self) -> dict[str, str] | None:
        return {"code": self.error_code, "message": self.error_message or ""} if self.error_code else None
