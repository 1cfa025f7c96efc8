"""Provider catalog inputs (API bodies and UI forms alike) and outputs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field, model_validator

from app.providers import catalog
from app.schemas import Patch, Strict

Name = Annotated[str, Field(min_length=1, max_length=catalog.MAX_NAME), AfterValidator(catalog.name)]
ProviderType = Annotated[
    str,
    Field(description=" | ".join(catalog.PROVIDER_TYPES)),
    AfterValidator(catalog.provider_type),
]
ModelId = Annotated[str, Field(min_length=1, max_length=catalog.MAX_MODEL), AfterValidator(catalog.model_id)]


class ProviderCreate(Strict):
    name: Name
    provider_type: ProviderType
    kind: str | None = Field(default=None, description="Fixed for openai/anthropic; required otherwise.")
    model_id: ModelId
    config: dict[str, Any] | None = Field(
        default=None, description="base_url (openai_compatible: required); account_id + gateway_id (gateway)."
    )
    secret_ref: str = Field(description="Id of a secret of this org holding the provider key.")

    @model_validator(mode="after")
    def _shape(self) -> Self:
        # Refused on its own field (kind, config.<key>): catalog.shape raises the 422 itself.
        shape = catalog.shape(self.provider_type, self.kind, self.config)
        self.kind, self.config = shape.kind, shape.config
        return self


class ProviderUpdate(Patch):
    """The fields to change; type, kind and config are checked together against the row."""

    # An explicit null is refused by the field's own rule (each takes None).
    name: Annotated[Name | None, AfterValidator(catalog.name)] = None
    provider_type: Annotated[str | None, AfterValidator(catalog.provider_type)] = None
    kind: str | None = None
    model_id: Annotated[ModelId | None, AfterValidator(catalog.model_id)] = None
    config: dict[str, Any] | None = None
    secret_ref: str | None = None


class ProviderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    provider_type: str
    kind: str
    model_id: str
    config: dict[str, Any]
    secret_ref: str
    created_at: datetime
    updated_at: datetime

    @computed_field(description="The unified model path, {kind}/{model_id}.")  # type: ignore[prop-decorator]
    @property
    def model_path(self) -> str:
        return f"{self.kind}/{self.model_id}"


class ProviderList(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    items: list[ProviderOut]
    next_cursor: str | None
