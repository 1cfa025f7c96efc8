"""MCP server inputs (API bodies and UI forms alike) and outputs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, computed_field

from app.mcp import catalog
from app.schemas import Patch, Strict, refuse

Name = Annotated[str, Field(min_length=1, max_length=catalog.MAX_NAME), AfterValidator(catalog.name)]
Url = Annotated[str, Field(min_length=1, max_length=catalog.MAX_URL), AfterValidator(catalog.url)]
Transport = Annotated[str, Field(pattern=catalog.TRANSPORT_PATTERN)]
SECRET_REF = Field(default=None, description="Id of a secret of this org, sent as the bearer token.")
# Declared so that the refusal can say what to do instead (app.mcp.service refuses it).
TOKEN = Field(default=None, description="Not accepted: create a secret and pass secret_ref.")
Scopes = Annotated[list[str] | None, AfterValidator(catalog.scopes)]
ClientId = Annotated[str | None, AfterValidator(catalog.client_id)]


class AuthIn(Strict):
    """How the server is authenticated. Omitted: by ``secret_ref`` / ``headers`` (or not at all)."""

    type: Literal["none", "bearer", "headers", "oauth", "oauth_client_credentials"]
    scope: Literal["org", "user"] = Field(
        default="org", description="oauth: one connection for the org (made by an admin) or one per member."
    )
    client_id: ClientId = Field(default=None, description="A pre-registered OAuth client (else registered at connect).")
    client_secret_ref: str | None = Field(
        default=None, description="Secret holding the client's secret (or PEM private key for private_key_jwt)."
    )
    token_endpoint_auth_method: (
        Literal["none", "client_secret_basic", "client_secret_post", "private_key_jwt"] | None
    ) = None
    scopes: Scopes = Field(default=None, description="Scopes to ask for (default: what the server advertises).")


class AuthOut(BaseModel):
    type: str = Field(description="none | bearer | headers | oauth | oauth_client_credentials")
    scope: str = Field(description="org | user")
    client_id: str | None = None
    client_secret_ref: str | None = None
    token_endpoint_auth_method: str | None = None
    scopes: list[str] | None = None


class ConnectionOut(BaseModel):
    """The caller's connection to an OAuth server: theirs (per-user servers) or the org's."""

    status: str = Field(description="connected | auth_required | expired | error")
    scope: str = Field(description="org | user")
    connected_at: datetime | None = None
    expires_at: datetime | None = None
    scopes: list[str] = Field(default_factory=list)
    error_code: str | None = None


class ConnectOut(BaseModel):
    authorization_url: str = Field(description="Send the user here to approve; they come back to /oauth/callback.")
    expires_at: datetime


class CallbackIn(Strict):
    state: str = Field(min_length=1, max_length=512)
    code: str = Field(min_length=1, max_length=4096)


HEADERS = Field(
    default=None,
    max_length=catalog.MAX_HEADERS,
    description=(
        f"Headers sent on every request, each a template over one secret (at most {catalog.MAX_HEADERS}). "
        "A list replaces the whole set; [] removes every header."
    ),
)


class HeaderIn(Strict):
    """One credential header: ``name: template``, where ``template`` holds ``{{secret}}`` once."""

    name: Annotated[str, Field(min_length=1, max_length=catalog.MAX_HEADER_NAME), AfterValidator(catalog.header_name)]
    template: Annotated[
        str,
        Field(
            min_length=1,
            max_length=catalog.MAX_HEADER_TEMPLATE,
            description=f"The header's value, with {catalog.PLACEHOLDER} where the secret's value goes.",
        ),
        AfterValidator(catalog.header_template),
    ]
    secret_ref: str = Field(description="Id of a secret of this org, substituted for {{secret}} at send time.")


class HeaderOut(BaseModel):
    """A credential header as stored: the template holds only the placeholder, never a value."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    template: str
    secret_ref: str


def _a_list(value: list[HeaderIn] | None) -> list[HeaderIn]:
    if value is None:
        raise refuse("must be a list of headers ([] removes every header)")
    return value


class McpServerCreate(Strict):
    name: Name
    url: Url
    transport: Transport = "streamable_http"
    secret_ref: str | None = SECRET_REF
    auth: AuthIn | None = None
    headers: list[HeaderIn] | None = HEADERS
    token: Any = TOKEN


class McpServerUpdate(Patch):
    """The fields to change; a new URL, transport, secret or header set re-queues validation."""

    NOTHING_TO_CHANGE = "give at least one of name, url, transport, secret_ref, headers, auth"

    # An explicit null is refused by the field's own rule (secret_ref: null unbinds).
    name: Annotated[Name | None, AfterValidator(catalog.name)] = None
    url: Annotated[Url | None, AfterValidator(catalog.url)] = None
    transport: Annotated[Transport | None, AfterValidator(catalog.transport)] = None
    secret_ref: str | None = None
    auth: AuthIn | None = None
    headers: Annotated[list[HeaderIn] | None, AfterValidator(_a_list)] = HEADERS
    token: Any = TOKEN


class StatusError(BaseModel):
    code: str
    message: str


class McpServerOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    url: str
    transport: str
    secret_ref: str | None
    auth_type: str = Field(exclude=True)
    connection_scope: str = Field(exclude=True)
    oauth_client_id: str | None = Field(exclude=True)
    oauth_client_secret_ref: str | None = Field(exclude=True)
    oauth_client_auth: str | None = Field(exclude=True)
    oauth_scopes: list[str] | None = Field(exclude=True)
    connection: ConnectionOut | None = Field(
        default=None, description="OAuth servers: the connection the caller's runs use (theirs, or the org's)."
    )
    headers: list[HeaderOut]
    status: str = Field(description="pending | validating | valid | invalid")
    status_error_code: str | None = Field(exclude=True)
    status_error_message: str | None = Field(exclude=True)
    validated_at: datetime | None
    tool_count: int
    created_at: datetime
    updated_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def auth(self) -> AuthOut:
        if self.auth_type == "static":
            kind = "bearer" if self.secret_ref else "none"
            if getattr(self, "headers", None):
                kind = "headers"
            return AuthOut(type=kind, scope="org")
        return AuthOut(
            type=self.auth_type,
            scope=self.connection_scope if self.auth_type == "oauth" else "org",
            client_id=self.oauth_client_id,
            client_secret_ref=self.oauth_client_secret_ref,
            token_endpoint_auth_method=self.oauth_client_auth,
            scopes=self.oauth_scopes,
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_error(self) -> StatusError | None:
        if not self.status_error_code:
            return None
        return StatusError(code=self.status_error_code, message=self.status_error_message or "")


class McpServerList(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    items: list[McpServerOut]
    next_cursor: str | None


class ToolOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    description: str | None
    input_schema: dict[str, Any]


class ToolList(BaseModel):
    items: list[ToolOut]
