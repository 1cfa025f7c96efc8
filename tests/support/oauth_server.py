"""A real OAuth 2.1 authorization server and an OAuth-protected MCP server for tests, built on the SDK's server auth.

`OAuthTestServer` runs, under uvicorn in background threads on 127.0.0.1 and free ports, what the MCP
authorization spec asks of a server:

- an MCP server (Streamable HTTP at `/mcp` or SSE at `/sse`) whose tools are `whoami` (the token's
  subject), `echo(text)` and `admin_tool()` (needs scope `admin`: without it, HTTP 403
  `insufficient_scope`). A 401 carries `WWW-Authenticate: Bearer resource_metadata="<PRM>"`; the
  protected resource metadata (RFC 9728) is at `/.well-known/oauth-protected-resource/mcp`. Only a
  token issued for this server's own URL (RFC 8707 `resource`) is accepted: a token with another
  resource, or none, is a 401.
- an authorization server (RFC 8414 metadata, also at `/.well-known/openid-configuration`) on the same
  origin or, with `separate_authorization_server`, on its own port: authorization code + PKCE S256 only
  (plain or a missing method is refused), an HTML consent page (or `auto_approve`), single-use 5-minute
  codes, dynamic client registration (RFC 7591), refresh tokens that rotate and are single use,
  revocation (RFC 7009), and client_credentials for pre-registered confidential clients
  (client_secret_post, client_secret_basic, or private_key_jwt when the pre-registered "secret" is a
  PEM public key).

The SDK's handlers do the work (`create_auth_routes`, `RequireAuthMiddleware`, `BearerAuthBackend`);
thin ASGI wrappers in front of them record what happened (never a token value, except in
`bearer_seen` and `issued_values()`, which exist for leak scans), add the client_credentials grant,
accept client_secret_basic for pre-registered clients, and check the admin scope.
No pytest fixtures here: tests wrap it as they need.

    with OAuthTestServer(auto_approve=True) as server:
        ...  # discover from server.url, register, authorize, exchange, call server.url

Standalone (foreground, Ctrl-C to stop):

    python -m tests.support.oauth_server --port 8766 [--auto-approve] [--transport sse] [--separate-as]
"""

from __future__ import annotations

import argparse
import base64
import contextvars
import hmac
import html
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

import anyio
import jwt
import uvicorn
from mcp.server.auth.handlers.metadata import MetadataHandler, ProtectedResourceMetadataHandler
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.routes import build_resource_metadata_url, cors_middleware, create_auth_routes
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.auth import (
    InvalidRedirectUriError,
    InvalidScopeError,
    OAuthClientInformationFull,
    OAuthMetadata,
    OAuthToken,
    ProtectedResourceMetadata,
)
from pydantic import AnyHttpUrl, AnyUrl, PrivateAttr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.mcp_server import PATHS, Transport

CODE_TTL = 300.0  # seconds an authorization code stays redeemable
CONSENT_PATH = "/consent"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
OIDC_METADATA_PATH = "/.well-known/openid-configuration"
AS_PATHS = frozenset(
    {"/authorize", "/token", "/register", "/revoke", CONSENT_PATH, AS_METADATA_PATH, OIDC_METADATA_PATH}
)
ADMIN_SCOPE = "admin"
ADMIN_TOOL = "admin_tool"
JWT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PEM_PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----"
ASSERTION_ALGORITHMS = ["RS256", "ES256"]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# The `resource` of the token request being handled (the SDK does not pass it on to the provider).
_token_request_resource: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oauth_test_token_resource", default=None
)


class _Client(OAuthClientInformationFull):
    """A registered client. Any scope the server supports may be requested (so a client can step up to `admin`);
    a pre-registered client may name any redirect URI."""

    _allowed_scopes: list[str] = PrivateAttr(default_factory=list)
    _any_redirect: bool = PrivateAttr(default=False)
    _public_key: str | None = PrivateAttr(default=None)
    _preregistered: bool = PrivateAttr(default=False)

    def validate_scope(self, requested_scope: str | None) -> list[str] | None:
        if requested_scope is None:
            return None
        requested = requested_scope.split()
        for scope in requested:
            if scope not in self._allowed_scopes:
                raise InvalidScopeError(f"scope {scope} is not supported")
        return requested

    def validate_redirect_uri(self, redirect_uri: AnyUrl | None) -> AnyUrl:
        if self._any_redirect and redirect_uri is not None:
            return redirect_uri
        if self._any_redirect and not self.redirect_uris:
            raise InvalidRedirectUriError("redirect_uri is required")
        return super().validate_redirect_uri(redirect_uri)


@dataclass
class _Token:
    """An issued access or refresh token: who it is for, what it may do, which grant it belongs to."""

    client_id: str
    scopes: list[str]
    resource: str | None
    subject: str
    grant_id: str
    expires: float | None = None  # access tokens only (time.time())
    revoked: bool = False


@dataclass
class _Pending:
    """An /authorize request waiting on the consent page."""

    client: _Client
    params: AuthorizationParams


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands `body` over once, then defers to the real one (for the disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_headers(scope: Scope, drop: Iterable[bytes], body_length: int | None = None) -> Scope:
    names = {n.lower() for n in drop}
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in names and k.lower() != b"content-length"]
    if body_length is not None:
        headers.append((b"content-length", str(body_length).encode()))
    return {**scope, "headers": headers}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _basic_credentials(scope: Scope) -> tuple[str, str] | None:
    raw = _header(scope, b"authorization") or ""
    if not raw.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(raw[6:].strip(), validate=True).decode()
    except ValueError:
        return None
    client_id, sep, secret = decoded.partition(":")
    return (unquote(client_id), unquote(secret)) if sep else None


def _bearer(scope: Scope) -> str | None:
    raw = _header(scope, b"authorization")
    if raw is None:
        return None
    kind, _, value = raw.partition(" ")
    return value.strip() if kind.lower() == "bearer" else None


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in {**NO_STORE, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _calls_tool(body: bytes, name: str) -> bool:
    """Whether a JSON-RPC message (or batch) is a tools/call of `name`."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    messages = parsed if isinstance(parsed, list) else [parsed]
    for message in messages:
        if isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            if isinstance(params, dict) and params.get("name") == name:
                return True
    return False


class _Provider:
    """The SDK's OAuthAuthorizationServerProvider, in memory. All state is guarded by the owner's lock."""

    def __init__(self, owner: OAuthTestServer) -> None:
        self.owner = owner
        self.clients: dict[str, _Client] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.used_codes: dict[str, str] = {}  # code -> grant id (a replayed code revokes its grant)
        self.access: dict[str, _Token] = {}
        self.refresh: dict[str, _Token] = {}
        self.pending: dict[str, _Pending] = {}
        self.used_jti: set[str] = set()

    # -- clients ---------------------------------------------------------------------------------------------
    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        with self.owner._lock:
            return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        client = _Client.model_validate(client_info.model_dump())
        client._allowed_scopes = list(self.owner.scopes_supported)
        with self.owner._lock:
            self.clients[client.client_id] = client
            if client.client_secret:
                self.owner._canaries.add(client.client_secret)
            self.owner.registrations.append(
                {
                    "client_id": client.client_id,
                    "client_name": client.client_name,
                    "redirect_uris": [str(u) for u in client.redirect_uris or []],
                    "grant_types": list(client.grant_types),
                    "token_endpoint_auth_method": client.token_endpoint_auth_method,
                    "scope": client.scope,
                }
            )

    # -- authorization ---------------------------------------------------------------------------------------
    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        assert isinstance(client, _Client)
        if self.owner.auto_approve:
            return self.approve(client, params, self.owner.next_user)
        request_id = secrets.token_urlsafe(16)
        with self.owner._lock:
            self.pending[request_id] = _Pending(client, params)
        return f"{self.owner.issuer}{CONSENT_PATH}?{urlencode({'request': request_id})}"

    def approve(self, client: _Client, params: AuthorizationParams, user: str) -> str:
        """Issue a code for `user` and return the redirect back to the client."""
        scopes = params.scopes or (client.scope.split() if client.scope else list(self.owner.default_scopes))
        code = secrets.token_urlsafe(32)
        with self.owner._lock:
            self.codes[code] = AuthorizationCode(
                code=code,
                scopes=scopes,
                expires_at=time.time() + CODE_TTL,
                client_id=client.client_id,
                code_challenge=params.code_challenge,
                redirect_uri=params.redirect_uri,
                redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
                resource=params.resource,
                subject=user,
            )
            self.owner._canaries.add(code)
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state, iss=self.owner.issuer)

    def deny(self, params: AuthorizationParams) -> str:
        return construct_redirect_uri(
            str(params.redirect_uri), error="access_denied", state=params.state, iss=self.owner.issuer
        )

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        with self.owner._lock:
            found = self.codes.get(authorization_code)
            if found is None and authorization_code in self.used_codes:
                # RFC 6749 §4.1.2: a code used twice revokes what it was exchanged for.
                self._revoke_grant(self.used_codes[authorization_code])
            return found

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        requested = _token_request_resource.get()
        with self.owner._lock:
            if self.codes.pop(authorization_code.code, None) is None:
                raise TokenError("invalid_grant", "authorization code was already used")
            resource = authorization_code.resource
            if requested is not None and resource is not None and requested != resource:
                raise TokenError("invalid_target", "resource differs from the one authorized")
            grant_id = secrets.token_hex(8)
            self.used_codes[authorization_code.code] = grant_id
            return self._issue(
                client.client_id,
                authorization_code.scopes,
                resource if resource is not None else requested,
                authorization_code.subject or self.owner.next_user,
                grant_id,
                with_refresh=True,
            )

    # -- refresh -----------------------------------------------------------------------------------------------
    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> RefreshToken | None:
        with self.owner._lock:
            found = self.refresh.get(refresh_token)
            if found is None or found.revoked:
                return None
            return RefreshToken(
                token=refresh_token,
                client_id=found.client_id,
                scopes=list(found.scopes),
                resource=found.resource,
                subject=found.subject,
            )

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        requested = _token_request_resource.get()
        with self.owner._lock:
            # Rotation: the old refresh token is gone the moment it is redeemed, even by a racing request.
            old = self.refresh.pop(refresh_token.token, None)
            if old is None or old.revoked:
                raise TokenError("invalid_grant", "refresh token is no longer valid")
            if requested is not None and old.resource is not None and requested != old.resource:
                raise TokenError("invalid_target", "resource differs from the one authorized")
            self.owner.refresh_redemptions += 1
            return self._issue(
                old.client_id,
                scopes,
                old.resource if old.resource is not None else requested,
                old.subject,
                old.grant_id,
                with_refresh=True,
            )

    # -- access tokens ---------------------------------------------------------------------------------------
    def _issue(
        self,
        client_id: str,
        scopes: list[str],
        resource: str | None,
        subject: str,
        grant_id: str,
        *,
        with_refresh: bool,
    ) -> OAuthToken:
        """Mint an access token (and a refresh token). Called with the lock held."""
        ttl = self.owner.access_token_ttl
        access = secrets.token_urlsafe(32)
        self.access[access] = _Token(client_id, list(scopes), resource, subject, grant_id, expires=time.time() + ttl)
        self.owner._canaries.add(access)
        refresh: str | None = None
        if with_refresh:
            refresh = secrets.token_urlsafe(32)
            self.refresh[refresh] = _Token(client_id, list(scopes), resource, subject, grant_id)
            self.owner._canaries.add(refresh)
        return OAuthToken(
            access_token=access,
            token_type="Bearer",
            expires_in=max(1, int(ttl)),
            scope=" ".join(scopes),
            refresh_token=refresh,
        )

    def valid_access(self, token: str) -> _Token | None:
        with self.owner._lock:
            found = self.access.get(token)
            if found is None or found.revoked or found.expires is None or found.expires <= time.time():
                return None
            return found

    async def load_access_token(self, token: str) -> AccessToken | None:
        with self.owner._lock:
            found = self.access.get(token)
            if found is None or found.revoked:
                return None
            return self.owner._access_token(token, found)

    # -- revocation ------------------------------------------------------------------------------------------
    def _revoke_grant(self, grant_id: str) -> None:
        for token in (*self.access.values(), *self.refresh.values()):
            if token.grant_id == grant_id:
                token.revoked = True

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        with self.owner._lock:
            if isinstance(token, RefreshToken):
                found = self.refresh.get(token.token)
                if found is not None and not found.revoked:
                    found.revoked = True
                    for access in self.access.values():
                        if access.grant_id == found.grant_id:
                            access.revoked = True
                    self.owner.revoked.append("refresh")
            else:
                access_found = self.access.get(token.token)
                if access_found is not None and not access_found.revoked:
                    access_found.revoked = True
                    self.owner.revoked.append("access")

    # -- client_credentials ----------------------------------------------------------------------------------
    def client_credentials(self, client: _Client, scope: str | None, resource: str | None) -> OAuthToken:
        requested = scope.split() if scope else list(self.owner.default_scopes)
        for name in requested:
            if name not in self.owner.scopes_supported:
                raise TokenError("invalid_scope", f"scope {name} is not supported")
        with self.owner._lock:
            return self._issue(
                client.client_id,
                requested,
                resource,
                f"client:{client.client_id}",
                secrets.token_hex(8),
                with_refresh=False,
            )


class _Verifier:
    """The MCP server's TokenVerifier: a known, unexpired, unrevoked token (the SDK then checks its resource)."""

    def __init__(self, owner: OAuthTestServer) -> None:
        self.owner = owner

    async def verify_token(self, token: str) -> AccessToken | None:
        found = self.owner._provider.valid_access(token)
        return None if found is None else self.owner._access_token(token, found)


class _TokenEndpoint:
    """In front of the SDK's token route: records the request, sleeps if asked, handles client_credentials, and
    lets a pre-registered client authenticate with client_secret_basic as well as client_secret_post."""

    def __init__(self, inner: ASGIApp, owner: OAuthTestServer) -> None:
        self.inner = inner
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.inner(scope, receive, send)
            return
        owner = self.owner
        body = await _read_body(receive)
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        basic = _basic_credentials(scope)
        grant_type = form.get("grant_type")
        client_id = form.get("client_id") or (basic[0] if basic else None) or _assertion_subject(form)
        with owner._lock:
            owner.token_requests.append(
                {
                    "grant_type": grant_type,
                    "client_id": client_id,
                    "resource": form.get("resource"),
                    "scope": form.get("scope"),
                }
            )
            if grant_type == "refresh_token":
                owner.refresh_attempts += 1
            for name in ("code_verifier", "client_secret", "client_assertion", "code", "refresh_token"):
                if form.get(name):
                    owner._canaries.add(form[name])
            if basic and basic[1]:
                owner._canaries.add(basic[1])
        if owner.token_endpoint_delay > 0:
            await anyio.sleep(owner.token_endpoint_delay)
        if grant_type == "client_credentials":
            await self._client_credentials(form, basic, client_id, send)
            return
        client = owner._provider.clients.get(client_id or "")
        if basic and client is not None and client_id == basic[0]:
            form["client_id"] = basic[0]
            if client._preregistered and client.token_endpoint_auth_method == "client_secret_post":
                form["client_secret"] = basic[1]
                scope = _with_headers(scope, [b"authorization"])
        body = urlencode(form).encode()
        scope = _with_headers(scope, [], len(body))
        token = _token_request_resource.set(form.get("resource"))
        try:
            await self.inner(scope, _replay(body, receive), send)
        finally:
            _token_request_resource.reset(token)

    async def _client_credentials(
        self, form: dict[str, str], basic: tuple[str, str] | None, client_id: str | None, send: Send
    ) -> None:
        owner = self.owner
        if not owner.client_credentials:
            await _send_json(send, 400, {"error": "unsupported_grant_type"})
            return
        client = owner._provider.clients.get(client_id or "")
        if client is None or not client._preregistered or "client_credentials" not in client.grant_types:
            await _send_json(send, 401, {"error": "invalid_client", "error_description": "unknown client"})
            return
        if not self._authenticated(client, form, basic):
            await _send_json(
                send, 401, {"error": "invalid_client", "error_description": "client authentication failed"}
            )
            return
        try:
            issued = owner._provider.client_credentials(client, form.get("scope"), form.get("resource"))
        except TokenError as exc:
            await _send_json(send, 400, {"error": exc.error, "error_description": exc.error_description})
            return
        await _send_json(send, 200, issued.model_dump(exclude_none=True))

    def _authenticated(self, client: _Client, form: dict[str, str], basic: tuple[str, str] | None) -> bool:
        if client._public_key is not None:
            if form.get("client_assertion_type") != JWT_ASSERTION_TYPE or not form.get("client_assertion"):
                return False
            return self._assertion_valid(client, client._public_key, form["client_assertion"])
        if client.client_secret is None:
            return False
        if basic is not None:
            offered = basic[1] if basic[0] == client.client_id else ""
        else:
            offered = form.get("client_secret", "")
        return bool(offered) and hmac.compare_digest(offered.encode(), client.client_secret.encode())

    def _assertion_valid(self, client: _Client, public_key: str, assertion: str) -> bool:
        owner = self.owner
        try:
            claims = jwt.decode(
                assertion,
                public_key,
                algorithms=ASSERTION_ALGORITHMS,
                audience=[owner.token_endpoint, owner.issuer],
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError:
            return False
        if claims.get("iss") != client.client_id or claims.get("sub") != client.client_id:
            return False
        jti = claims.get("jti")
        with owner._lock:
            if jti is not None:
                if jti in owner._provider.used_jti:
                    return False
                owner._provider.used_jti.add(str(jti))
        return True


def _assertion_subject(form: dict[str, str]) -> str | None:
    """The client a private_key_jwt assertion names (unverified: only to find the client to verify it with)."""
    assertion = form.get("client_assertion")
    if not assertion:
        return None
    try:
        sub = jwt.decode(assertion, options={"verify_signature": False}).get("sub")
    except jwt.PyJWTError:
        return None
    return sub if isinstance(sub, str) else None


class _AuthorizeEndpoint:
    """In front of the SDK's authorize route: records the request; a missing code_challenge_method means plain
    (RFC 7636 §4.3), which the SDK refuses like any method but S256."""

    def __init__(self, inner: ASGIApp, owner: OAuthTestServer) -> None:
        self.inner = inner
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "POST"):
            await self.inner(scope, receive, send)
            return
        if scope["method"] == "GET":
            params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        else:
            body = await _read_body(receive)
            params = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        with self.owner._lock:
            self.owner.authorize_requests.append(
                {
                    name: params.get(name)
                    for name in ("client_id", "redirect_uri", "scope", "resource", "code_challenge_method")
                }
            )
        if "code_challenge_method" not in params:
            params["code_challenge_method"] = "plain"
        encoded = urlencode(params).encode()
        if scope["method"] == "GET":
            scope = {**scope, "query_string": encoded}
        else:
            scope = _with_headers(scope, [], len(encoded))
            receive = _replay(encoded, receive)
        await self.inner(scope, receive, send)


class _RevokeEndpoint:
    """In front of the SDK's revocation route: client_secret_basic for pre-registered clients, and a public
    client's request without a client_secret (the SDK's request model wants the field present)."""

    def __init__(self, inner: ASGIApp, owner: OAuthTestServer) -> None:
        self.inner = inner
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.inner(scope, receive, send)
            return
        body = await _read_body(receive)
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        basic = _basic_credentials(scope)
        if basic:
            form.setdefault("client_id", basic[0])
            client = self.owner._provider.clients.get(basic[0])
            if (
                client is not None
                and client._preregistered
                and client.token_endpoint_auth_method != "client_secret_basic"
            ):
                form["client_secret"] = basic[1]
                scope = _with_headers(scope, [b"authorization"])
        form.setdefault("client_secret", "")
        encoded = urlencode(form).encode()
        await self.inner(_with_headers(scope, [], len(encoded)), _replay(encoded, receive), send)


class _ResourceGuard:
    """In front of the MCP app: records every bearer token, answers a tools/call of admin_tool without the admin
    scope with 403 insufficient_scope, and (unless advertised) keeps resource_metadata out of the 401."""

    def __init__(self, inner: ASGIApp, owner: OAuthTestServer) -> None:
        self.inner = inner
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        owner = self.owner
        bearer = _bearer(scope)
        if bearer is not None:
            with owner._lock:
                owner.bearer_seen.append(bearer)
        if scope["method"] == "POST":
            body = await _read_body(receive)
            receive = _replay(body, receive)
            if bearer is not None and _calls_tool(body, ADMIN_TOOL):
                token = await owner._verifier.verify_token(bearer)
                if token is not None and owner._for_this_resource(token) and ADMIN_SCOPE not in token.scopes:
                    await self._insufficient_scope(token, send)
                    return
        if not owner.advertise_in_www_authenticate:
            send = _without_resource_metadata(send)
        await self.inner(scope, receive, send)

    async def _insufficient_scope(self, token: AccessToken, send: Send) -> None:
        owner = self.owner
        needed = [*owner.default_scopes, *token.scopes, ADMIN_SCOPE]
        ordered = [s for s in owner.scopes_supported if s in needed]
        ordered += [s for s in dict.fromkeys(needed) if s not in ordered]
        parts = [
            'error="insufficient_scope"',
            f'scope="{" ".join(ordered)}"',
            f'error_description="{ADMIN_TOOL} requires scope {ADMIN_SCOPE}"',
        ]
        if owner.advertise_in_www_authenticate:
            parts.append(f'resource_metadata="{owner.resource_metadata_url}"')
        await _send_json(
            send,
            403,
            {"error": "insufficient_scope", "error_description": f"{ADMIN_TOOL} requires scope {ADMIN_SCOPE}"},
            {"WWW-Authenticate": "Bearer " + ", ".join(parts)},
        )


def _without_resource_metadata(send: Send) -> Send:
    async def stripped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = []
            for name, value in message.get("headers", []):
                if name.lower() == b"www-authenticate":
                    kept = [p for p in value.decode("latin-1").split(", ") if "resource_metadata=" not in p]
                    value = ", ".join(kept).encode("latin-1")
                headers.append((name, value))
            message = {**message, "headers": headers}
        await send(message)

    return stripped


class _Dispatch:
    """One origin for both servers: the AS paths go to the authorization server, the rest to the MCP server."""

    def __init__(self, auth_app: ASGIApp, mcp_app: ASGIApp) -> None:
        self.auth_app = auth_app
        self.mcp_app = mcp_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in AS_PATHS:
            await self.auth_app(scope, receive, send)
        else:
            await self.mcp_app(scope, receive, send)


def _caller_subject(ctx: Context) -> str | None:
    request = ctx.request_context.request
    user = getattr(request, "scope", {}).get("user") if request is not None else None
    if isinstance(user, AuthenticatedUser):
        return user.access_token.subject
    token = get_access_token()
    return token.subject if token is not None else None


class _Listener:
    """One uvicorn server on a pre-bound 127.0.0.1 socket, run in a daemon thread."""

    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port: int = self.sock.getsockname()[1]
        self.name = name
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def start(self, app: ASGIApp, wait: float) -> None:
        self.sock.listen(128)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=f"{self.name}-{self.port}", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + wait
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"{self.name} failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start in time")
            time.sleep(0.01)

    def stop(self, wait: float) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(wait)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(wait)
        self.sock.close()
        self.server = None
        self.thread = None


class OAuthTestServer:
    """An OAuth-protected MCP server and its authorization server on 127.0.0.1. A context manager, or start/stop."""

    def __init__(
        self,
        *,
        transport: Transport = "streamable_http",
        access_token_ttl: float = 60.0,
        scopes_supported: Iterable[str] = ("tools:read", "tools:call", ADMIN_SCOPE),
        default_scopes: Iterable[str] = ("tools:read", "tools:call"),
        dynamic_registration: bool = True,
        preregistered: dict[str, str | None] | None = None,
        auto_approve: bool = False,
        revocation: bool = True,
        client_credentials: bool = True,
        separate_authorization_server: bool = False,
        advertise_in_www_authenticate: bool = True,
        token_endpoint_delay: float = 0.0,
        port: int = 0,
        authorization_server_port: int = 0,
    ) -> None:
        if transport not in PATHS:
            raise ValueError(f"unknown transport {transport!r}")
        self.transport: Transport = transport
        self.access_token_ttl = access_token_ttl
        self.scopes_supported: tuple[str, ...] = tuple(scopes_supported)
        self.default_scopes: tuple[str, ...] = tuple(default_scopes)
        self.dynamic_registration = dynamic_registration
        self.auto_approve = auto_approve
        self.revocation = revocation
        self.client_credentials = client_credentials
        self.separate_authorization_server = separate_authorization_server
        self.advertise_in_www_authenticate = advertise_in_www_authenticate
        self.token_endpoint_delay = token_endpoint_delay
        self.next_user = "alice"

        self._lock = threading.RLock()
        self._canaries: set[str] = set()
        # What happened (appended and counted under the lock; never a token value outside bearer_seen).
        self.refresh_redemptions = 0  # successful refresh_token grants
        self.refresh_attempts = 0  # every refresh_token grant request, failed ones included
        self.token_requests: list[dict[str, Any]] = []  # {grant_type, client_id, resource, scope}
        self.registrations: list[dict[str, Any]] = []  # DCR client metadata
        self.revoked: list[str] = []  # "access" / "refresh", one per revocation
        self.authorize_requests: list[dict[str, Any]] = []  # {client_id, redirect_uri, scope, resource, ...}
        self.bearer_seen: list[str] = []  # every bearer token presented to the MCP server

        self._mcp_listener = _Listener(port, "oauth-mcp-test")
        self._as_listener = (
            _Listener(authorization_server_port, "oauth-as-test") if separate_authorization_server else None
        )
        self.port = self._mcp_listener.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url = self.base_url + PATHS[transport]
        self.issuer = f"http://127.0.0.1:{self._as_listener.port}" if self._as_listener else self.base_url
        self.token_endpoint = self.issuer + "/token"
        self.resource_metadata_url = str(build_resource_metadata_url(AnyHttpUrl(self.url)))

        self._provider = _Provider(self)
        self._verifier = _Verifier(self)
        for client_id, secret in (preregistered or {}).items():
            self._preregister(client_id, secret)
        self._started = False

    # -- what tests read and do ------------------------------------------------------------------------------
    def issued_values(self) -> set[str]:
        """Every access token, refresh token, code, code_verifier and client secret it issued or saw."""
        with self._lock:
            return set(self._canaries)

    def revoke_refresh_tokens(self) -> None:
        """Server-side: every refresh token becomes invalid (the next refresh is invalid_grant)."""
        with self._lock:
            for token in self._provider.refresh.values():
                token.revoked = True

    def expire_access_tokens(self) -> None:
        """Every access token is expired from now on (the next MCP call is a 401)."""
        with self._lock:
            now = time.time()
            for token in self._provider.access.values():
                token.expires = min(token.expires or now, now - 1)

    def consent_url_prefix(self) -> str:
        """Where the consent page lives (absolute URL, without the query): a browser lands on `<this>?request=...`."""
        return self.issuer + CONSENT_PATH

    # -- building --------------------------------------------------------------------------------------------
    def _preregister(self, client_id: str, secret: str | None) -> None:
        is_key = secret is not None and secret.lstrip().startswith(PEM_PUBLIC_KEY)
        if secret is None:
            method, grants = "none", ["authorization_code", "refresh_token"]
        elif is_key:
            method, grants = "private_key_jwt", ["client_credentials"]
        else:
            method, grants = "client_secret_post", ["authorization_code", "refresh_token", "client_credentials"]
        client = _Client(
            client_id=client_id,
            client_secret=None if is_key else secret,
            token_endpoint_auth_method=method,
            grant_types=grants,
            scope=" ".join(self.default_scopes),
        )
        client._allowed_scopes = list(self.scopes_supported)
        client._any_redirect = True
        client._public_key = secret if is_key else None
        client._preregistered = True
        self._provider.clients[client_id] = client
        if secret is not None and not is_key:
            self._canaries.add(secret)

    def _access_token(self, token: str, found: _Token) -> AccessToken:
        return AccessToken(
            token=token,
            client_id=found.client_id,
            scopes=list(found.scopes),
            expires_at=None if found.expires is None else int(found.expires) + 1,
            resource=found.resource,
            subject=found.subject,
            claims={"iss": self.issuer},
        )

    def _for_this_resource(self, token: AccessToken) -> bool:
        return (token.resource or "").rstrip("/") == self.url.rstrip("/")

    def _metadata(self) -> OAuthMetadata:
        grants = ["authorization_code", "refresh_token"] + (["client_credentials"] if self.client_credentials else [])
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.token_endpoint,
            "scopes_supported": list(self.scopes_supported),
            "response_types_supported": ["code"],
            "grant_types_supported": grants,
            "token_endpoint_auth_methods_supported": [
                "none",
                "client_secret_post",
                "client_secret_basic",
                "private_key_jwt",
            ],
            "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
        }
        if self.dynamic_registration:
            document["registration_endpoint"] = self.issuer + "/register"
        if self.revocation:
            document["revocation_endpoint"] = self.issuer + "/revoke"
            document["revocation_endpoint_auth_methods_supported"] = [
                "none",
                "client_secret_post",
                "client_secret_basic",
            ]
        return OAuthMetadata.model_validate(document)

    def _auth_app(self) -> Starlette:
        sdk_routes = create_auth_routes(
            provider=self._provider,  # type: ignore[arg-type]  # a structural match of the SDK's Protocol
            issuer_url=AnyHttpUrl(self.issuer),
            client_registration_options=ClientRegistrationOptions(
                enabled=self.dynamic_registration,
                valid_scopes=list(self.scopes_supported),
                default_scopes=list(self.default_scopes),
            ),
            revocation_options=RevocationOptions(enabled=self.revocation),
        )
        wrappers: dict[str, type[_TokenEndpoint | _AuthorizeEndpoint | _RevokeEndpoint]] = {
            "/token": _TokenEndpoint,
            "/authorize": _AuthorizeEndpoint,
            "/revoke": _RevokeEndpoint,
        }
        metadata = cors_middleware(MetadataHandler(self._metadata()).handle, ["GET", "OPTIONS"])
        routes = [
            Route(AS_METADATA_PATH, endpoint=metadata, methods=["GET", "OPTIONS"]),
            Route(OIDC_METADATA_PATH, endpoint=metadata, methods=["GET", "OPTIONS"]),
            Route(CONSENT_PATH, endpoint=self._consent, methods=["GET", "POST"]),
        ]
        for route in sdk_routes:
            if route.path == AS_METADATA_PATH:
                continue
            wrapper = wrappers.get(route.path)
            endpoint = wrapper(route.app, self) if wrapper else route.app
            routes.append(Route(route.path, endpoint=endpoint, methods=sorted(route.methods or [])))
        return Starlette(routes=routes)

    async def _consent(self, request: Request) -> Response:
        if request.method == "GET":
            request_id = request.query_params.get("request", "")
            with self._lock:
                pending = self._provider.pending.get(request_id)
            if pending is None:
                return HTMLResponse("<!doctype html><p>Unknown or finished authorization request.</p>", 400)
            return HTMLResponse(_consent_page(request_id, pending, self.next_user), headers=NO_STORE)
        form = await request.form()
        request_id = str(form.get("request", ""))
        with self._lock:
            pending = self._provider.pending.pop(request_id, None)
        if pending is None:
            return HTMLResponse("<!doctype html><p>Unknown or finished authorization request.</p>", 400)
        if form.get("action") == "approve":
            user = str(form.get("user") or self.next_user)
            target = self._provider.approve(pending.client, pending.params, user)
        else:
            target = self._provider.deny(pending.params)
        return RedirectResponse(target, status_code=302, headers=NO_STORE)

    def _mcp_app(self) -> ASGIApp:
        mcp = MCPServer(
            "latchkey-oauth-test",
            token_verifier=self._verifier,
            auth=AuthSettings(
                issuer_url=AnyHttpUrl(self.issuer),
                resource_server_url=AnyHttpUrl(self.url),
                validate_token_resource=True,
            ),
            log_level="WARNING",
        )

        @mcp.tool()
        def whoami(ctx: Context) -> str:
            """The subject of the caller's access token (a user, or client:<id> for client_credentials)."""
            return _caller_subject(ctx) or ""

        @mcp.tool()
        def echo(text: str) -> str:
            """Return the text unchanged."""
            return text

        @mcp.tool()
        def admin_tool() -> str:
            """Needs the admin scope."""
            return "admin ok"

        inner: ASGIApp = (
            mcp.sse_app(host="127.0.0.1") if self.transport == "sse" else mcp.streamable_http_app(host="127.0.0.1")
        )
        prm = ProtectedResourceMetadata.model_validate(
            {
                "resource": self.url,
                "authorization_servers": [self.issuer],
                "scopes_supported": list(self.scopes_supported),
                "resource_name": "Latchkey OAuth test MCP server",
            }
        )
        prm_path = self.resource_metadata_url.removeprefix(self.base_url)
        prm_app = cors_middleware(ProtectedResourceMetadataHandler(prm).handle, ["GET", "OPTIONS"])
        guarded = _ResourceGuard(inner, self)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == prm_path:
                await prm_app(scope, receive, send)
            else:
                await guarded(scope, receive, send)

        return app

    # -- running ---------------------------------------------------------------------------------------------
    def start(self, wait: float = 10.0) -> OAuthTestServer:
        if self._started:
            raise RuntimeError("server already started")
        self._started = True
        try:
            if self._as_listener is not None:
                self._as_listener.start(self._auth_app(), wait)
                self._mcp_listener.start(self._mcp_app(), wait)
            else:
                self._mcp_listener.start(_Dispatch(self._auth_app(), self._mcp_app()), wait)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, wait: float = 5.0) -> None:
        self._mcp_listener.stop(wait)
        if self._as_listener is not None:
            self._as_listener.stop(wait)

    def __enter__(self) -> OAuthTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _consent_page(request_id: str, pending: _Pending, user: str) -> str:
    client = pending.client
    name = html.escape(client.client_name or client.client_id)
    scopes = html.escape(" ".join(pending.params.scopes or []) or "(default)")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Authorize {name}</title></head>
<body>
<h1>Authorize {name}</h1>
<p>Scopes: <span id="scopes">{scopes}</span></p>
<form method="post" action="{CONSENT_PATH}">
<input type="hidden" name="request" value="{html.escape(request_id)}">
<label for="user">User</label> <input type="text" id="user" name="user" value="{html.escape(user)}">
<button type="submit" id="approve" name="action" value="approve">Approve</button>
<button type="submit" id="deny" name="action" value="deny">Deny</button>
</form>
</body></html>
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Latchkey OAuth test MCP server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--transport", choices=sorted(PATHS), default="streamable_http")
    parser.add_argument("--auto-approve", action="store_true", help="skip the consent page")
    parser.add_argument("--separate-as", action="store_true", help="run the authorization server on its own port")
    parser.add_argument("--as-port", type=int, default=0, help="the authorization server's port (with --separate-as)")
    parser.add_argument("--ttl", type=float, default=60.0, help="access token lifetime in seconds")
    args = parser.parse_args(argv)
    server = OAuthTestServer(
        transport=args.transport,
        auto_approve=args.auto_approve,
        separate_authorization_server=args.separate_as,
        access_token_ttl=args.ttl,
        port=args.port,
        authorization_server_port=args.as_port,
    )
    with server:
        print(f"OAuth test MCP server ({args.transport}) on {server.url}, issuer {server.issuer}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
