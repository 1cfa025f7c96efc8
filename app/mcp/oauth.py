"""OAuth 2.1 for MCP servers, worker side: discovery, client registration, PKCE, token requests, revocation.

Follows the MCP authorization specification: the server's Protected Resource Metadata (RFC 9728,
from ``WWW-Authenticate`` or the well-known URLs), then its authorization server's metadata
(RFC 8414, or OpenID discovery), client registration (pre-registered, a Client ID Metadata
Document where the server supports one, else RFC 7591 dynamic registration), PKCE S256 only, and
the RFC 8707 ``resource`` indicator on every authorization and token request, so each token is
bound to the one MCP server it was issued for.

Every request goes out through the egress guard (``app.egress``): a discovery document that
points at a private or metadata address is refused like any other destination. A client secret
is only ever sent to a host its secret allows. Errors are ``OAuthError`` with a stable ``code``
and a message that holds no token, code, verifier, secret or server body.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import httpx2
import jwt
from mcp.client.auth.utils import (
    build_oauth_authorization_server_metadata_discovery_urls,
    build_protected_resource_metadata_discovery_urls,
    extract_field_from_www_auth,
)
from mcp.shared.auth import OAuthMetadata, ProtectedResourceMetadata
from pydantic import ValidationError

from app.errors import WorkerError

log = logging.getLogger("latchkey.oauth")

# A client for one destination: ``factory(allowed_hosts)`` -> an egress-guarded httpx2.Client.
ClientFactory = Callable[[Sequence[str]], httpx2.Client]

CLIENT_NAME: Final = "Latchkey"
# What a token endpoint's answer, or a metadata document, may hold (the guard caps the wire bytes too).
MAX_DOCUMENT_BYTES: Final = 256 * 1024
AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")

MESSAGES: Final = {
    "discovery_failed": "the MCP server's authorization metadata could not be read",
    "registration_failed": "the authorization server did not register a client",
    "pkce_unsupported": "the authorization server does not support PKCE with S256",
    "invalid_grant": "the authorization server refused the grant (consent revoked or expired)",
    "invalid_client": "the authorization server refused the client credentials",
    "token_error": "the authorization server did not issue a token",
    "unreachable": "the authorization server could not be reached",
}


class OAuthError(WorkerError):
    """A failed OAuth exchange; ``code`` is one of ``MESSAGES`` (or the guard's own code)."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code, message if message is not None else MESSAGES.get(code, "OAuth request failed"))


@dataclass(frozen=True)
class AuthServer:
    """An authorization server as its metadata describes it (only what Latchkey uses)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    scopes_supported: tuple[str, ...] = ()
    token_auth_methods: tuple[str, ...] = ()
    client_id_metadata_documents: bool = False

    def stored(self) -> dict[str, Any]:
        """What a flow or a connection keeps of it (sealed): the endpoints its later requests use."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "revocation_endpoint": self.revocation_endpoint,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> AuthServer:
        return cls(
            issuer=data["issuer"],
            authorization_endpoint=data.get("authorization_endpoint") or "",
            token_endpoint=data["token_endpoint"],
            revocation_endpoint=data.get("revocation_endpoint"),
        )


@dataclass(frozen=True)
class Discovery:
    """What a connection needs to know about a server before it asks anyone for consent."""

    resource: str
    server: AuthServer
    # Scopes to ask for when nobody configured any: the 401's ``scope``, else the metadata's.
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OAuthClient:
    """The client Latchkey is at one authorization server. ``secret`` only for registered confidential ones."""

    client_id: str
    auth_method: str = "none"
    secret: str | None = field(default=None, repr=False)
    # The hosts a pre-registered client secret may be sent to (its managed secret's allowed_hosts;
    # empty: that secret restricts no host).
    secret_hosts: tuple[str, ...] = ()
    # A pre-registered client's secret lives in a managed secret of its own and is resolved on each
    # use; a registered one's (dynamic registration) is kept, sealed, with the flow or connection.
    preregistered: bool = False

    def stored(self) -> dict[str, Any]:
        """What a flow or a connection keeps of it (sealed): never a pre-registered client's secret."""
        return {
            "client_id": self.client_id,
            "auth_method": self.auth_method,
            "secret": None if self.preregistered else self.secret,
        }

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> OAuthClient:
        return cls(data["client_id"], data["auth_method"], data.get("secret"))


@dataclass(frozen=True)
class TokenSet:
    """Tokens as issued. ``expires_at``: seconds since the epoch, None when the server gave no lifetime."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    issued_at: float = 0.0
    scopes: tuple[str, ...] = ()

    def values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.access_token, self.refresh_token) if v)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scopes"] = list(self.scopes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenSet:
        return cls(
            access_token=str(data["access_token"]),
            refresh_token=data.get("refresh_token"),
            expires_at=data.get("expires_at"),
            issued_at=float(data.get("issued_at") or 0.0),
            scopes=tuple(data.get("scopes") or ()),
        )


# Discovery ------------------------------------------------------------------------------------


def canonical_resource(url: str) -> str:
    """The RFC 8707 resource for an MCP server URL: lower-case scheme and host, no fragment or query."""
    parts = urlsplit(url)
    path = parts.path if parts.path != "/" else ""
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def _same_origin_parent(resource: str, server_url: str) -> bool:
    """The metadata's ``resource`` is the server URL or a path above it on the same origin."""
    want, have = urlsplit(canonical_resource(server_url)), urlsplit(canonical_resource(resource))
    if (want.scheme, want.netloc) != (have.scheme, have.netloc):
        return False
    base = have.path.rstrip("/")
    return want.path == have.path or want.path.startswith(base + "/") or not base


def _get_json(http: httpx2.Client, url: str) -> Any | None:
    """A JSON document at ``url``; None for 4xx (try the next URL). Guard refusals propagate."""
    try:
        response = http.get(url, headers={"Accept": "application/json", "MCP-Protocol-Version": "2025-11-25"})
    except httpx2.HTTPError:
        raise OAuthError("unreachable") from None
    if response.status_code >= 400 or len(response.content) > MAX_DOCUMENT_BYTES:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _probe(http: httpx2.Client, server_url: str) -> tuple[str | None, str | None]:
    """An unauthenticated MCP request: the 401's ``resource_metadata`` and ``scope`` (RFC 9728 §5.1)."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": CLIENT_NAME, "version": "1"},
        },
    }
    try:
        response = http.post(server_url, json=body, headers={"Accept": "application/json, text/event-stream"})
    except httpx2.HTTPError:
        raise OAuthError("unreachable", "the MCP server could not be reached") from None
    if response.status_code not in (401, 403):
        return None, None
    return (
        extract_field_from_www_auth(response, "resource_metadata"),
        extract_field_from_www_auth(response, "scope"),
    )


def _auth_server(http: httpx2.Client, as_url: str | None, server_url: str) -> AuthServer:
    for url in build_oauth_authorization_server_metadata_discovery_urls(as_url, server_url):
        doc = _get_json(http, url)
        if doc is None:
            continue
        try:
            meta = OAuthMetadata.model_validate(doc)
        except ValidationError:
            continue
        # RFC 8414 §3.3: the issuer must be the server the document was asked about.
        if as_url and str(meta.issuer).rstrip("/") != as_url.rstrip("/"):
            raise OAuthError("discovery_failed", "the authorization server's metadata names another issuer")
        methods = meta.code_challenge_methods_supported
        if methods is not None and "S256" not in methods:
            raise OAuthError("pkce_unsupported")
        return AuthServer(
            issuer=str(meta.issuer),
            authorization_endpoint=str(meta.authorization_endpoint),
            token_endpoint=str(meta.token_endpoint),
            registration_endpoint=str(meta.registration_endpoint) if meta.registration_endpoint else None,
            revocation_endpoint=str(meta.revocation_endpoint) if meta.revocation_endpoint else None,
            scopes_supported=tuple(meta.scopes_supported or ()),
            token_auth_methods=tuple(meta.token_endpoint_auth_methods_supported or ()),
            client_id_metadata_documents=bool(meta.client_id_metadata_document_supported),
        )
    raise OAuthError("discovery_failed", "the authorization server publishes no metadata")


def discover(http: httpx2.Client, server_url: str) -> Discovery:
    """Protected Resource Metadata, then the authorization server's metadata."""
    metadata_url, challenge_scope = _probe(http, server_url)
    prm: ProtectedResourceMetadata | None = None
    for url in build_protected_resource_metadata_discovery_urls(metadata_url, server_url):
        doc = _get_json(http, url)
        if doc is None:
            continue
        try:
            prm = ProtectedResourceMetadata.model_validate(doc)
        except ValidationError:
            continue
        break
    resource = canonical_resource(server_url)
    as_url: str | None = None
    scopes: tuple[str, ...] = tuple(challenge_scope.split()) if challenge_scope else ()
    if prm is not None:
        if not _same_origin_parent(str(prm.resource), server_url):
            raise OAuthError("discovery_failed", "the server's resource metadata names another resource")
        as_url = str(prm.authorization_servers[0])
        scopes = scopes or tuple(prm.scopes_supported or ())
    server = _auth_server(http, as_url, server_url)
    return Discovery(resource=resource, server=server, scopes=scopes or server.scopes_supported)


# Registration ---------------------------------------------------------------------------------

CLIENT_METADATA_PATH: Final = "/oauth/client-metadata.json"


def client_metadata_url(public_url: str) -> str:
    """This deployment's client id where servers take Client ID Metadata Documents: the document's URL."""
    return public_url.rstrip("/") + CLIENT_METADATA_PATH


def client_metadata(public_url: str) -> dict[str, Any]:
    """The Client ID Metadata Document the web tier serves (a public client: PKCE protects its codes)."""
    return {
        "client_id": client_metadata_url(public_url),
        "client_name": CLIENT_NAME,
        "client_uri": public_url.rstrip("/") + "/",
        "redirect_uris": [public_url.rstrip("/") + "/oauth/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def register(http: httpx2.Client, server: AuthServer, redirect_uri: str, scopes: Sequence[str]) -> OAuthClient:
    """RFC 7591 dynamic registration of a public client (PKCE protects its codes)."""
    if not server.registration_endpoint:
        raise OAuthError(
            "registration_failed",
            "the authorization server supports no dynamic registration: configure a pre-registered client id",
        )
    metadata: dict[str, Any] = {
        "client_name": CLIENT_NAME,
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    if scopes:
        metadata["scope"] = " ".join(scopes)
    try:
        response = http.post(server.registration_endpoint, json=metadata)
    except httpx2.HTTPError:
        raise OAuthError("unreachable") from None
    if response.status_code not in (200, 201):
        raise OAuthError("registration_failed", f"{MESSAGES['registration_failed']} (HTTP {response.status_code})")
    try:
        info = response.json()
        client_id = str(info["client_id"])
    except (ValueError, KeyError, TypeError):
        raise OAuthError("registration_failed") from None
    secret = info.get("client_secret")
    method = str(info.get("token_endpoint_auth_method") or ("client_secret_post" if secret else "none"))
    return OAuthClient(client_id=client_id, auth_method=method, secret=secret if isinstance(secret, str) else None)


# PKCE and the authorization request -----------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A PKCE verifier (RFC 7636: 43-128 unreserved characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    server: AuthServer,
    client: OAuthClient,
    *,
    redirect_uri: str,
    state: str,
    challenge: str,
    resource: str,
    scopes: Sequence[str],
) -> str:
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
    }
    if scopes:
        params["scope"] = " ".join(scopes)
    sep = "&" if urlsplit(server.authorization_endpoint).query else "?"
    return server.authorization_endpoint + sep + urlencode(params)


# Token requests -------------------------------------------------------------------------------


def client_assertion(client: OAuthClient, audience: str) -> str:
    """A private_key_jwt assertion (RFC 7523): the client's PEM private key signs iss/sub/aud/jti/exp."""
    assert client.secret is not None
    now = int(time.time())
    claims = {"iss": client.client_id, "sub": client.client_id, "aud": audience, "iat": now, "exp": now + 120}
    claims["jti"] = str(uuid.uuid4())
    key = client.secret.strip()
    algorithm = "ES256" if "EC PRIVATE KEY" in key else "RS256"
    try:
        return jwt.encode(claims, key, algorithm=algorithm)
    except (ValueError, TypeError, jwt.PyJWTError):
        raise OAuthError("invalid_client", "the client's private key could not sign an assertion") from None


def _authenticate(client: OAuthClient, data: dict[str, str], token_endpoint: str) -> Any:
    """Add the client's authentication to a token request (form fields, or HTTP Basic)."""
    data["client_id"] = client.client_id
    if client.auth_method == "client_secret_basic" and client.secret:
        del data["client_id"]
        return httpx2.BasicAuth(client.client_id, client.secret)
    if client.auth_method == "client_secret_post" and client.secret:
        data["client_secret"] = client.secret
    elif client.auth_method == "private_key_jwt" and client.secret:
        data["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        data["client_assertion"] = client_assertion(client, token_endpoint)
    return None


def token_request(
    factory: ClientFactory, server: AuthServer, client: OAuthClient, data: dict[str, str], *, now: float | None = None
) -> TokenSet:
    """POST a token request; the issued tokens, or OAuthError (``invalid_grant`` when the grant is dead)."""
    form = dict(data)
    auth = _authenticate(client, form, server.token_endpoint)
    sends_secret = client.secret is not None and client.auth_method != "none"
    hosts = client.secret_hosts if sends_secret else ()
    issued_at = time.time() if now is None else now
    with factory(hosts) as http:
        try:
            response = http.post(server.token_endpoint, data=form, auth=auth, headers={"Accept": "application/json"})
        except httpx2.HTTPError:
            raise OAuthError("unreachable") from None
    try:
        body = response.json() if len(response.content) <= MAX_DOCUMENT_BYTES else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200:
        error = body.get("error")
        if error == "invalid_grant":
            raise OAuthError("invalid_grant")
        if error in ("invalid_client", "unauthorized_client"):
            raise OAuthError("invalid_client")
        raise OAuthError("token_error", f"{MESSAGES['token_error']} (HTTP {response.status_code})")
    access = body.get("access_token")
    if not isinstance(access, str) or not access or str(body.get("token_type", "")).lower() != "bearer":
        raise OAuthError("token_error", "the authorization server's answer held no bearer access token")
    refresh = body.get("refresh_token")
    lifetime = body.get("expires_in")
    expires_at = None
    if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and lifetime > 0:
        expires_at = issued_at + float(lifetime)
    scope = body.get("scope")
    granted = tuple(scope.split()) if isinstance(scope, str) else tuple(data.get("scope", "").split())
    return TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
        expires_at=expires_at,
        issued_at=issued_at,
        scopes=granted,
    )


def revoke(factory: ClientFactory, endpoint: str, client: OAuthClient, token: str, hint: str) -> bool:
    """RFC 7009 revocation of one token; True when the server took it (200)."""
    form = {"token": token, "token_type_hint": hint}
    auth = _authenticate(client, form, endpoint)
    sends_secret = client.secret is not None and client.auth_method != "none"
    with factory(client.secret_hosts if sends_secret else ()) as http:
        try:
            response = http.post(endpoint, data=form, auth=auth)
        except httpx2.HTTPError:
            return False
    return response.status_code == 200
