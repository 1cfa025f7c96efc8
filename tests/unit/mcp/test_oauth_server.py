"""tests/support/oauth_server.py end to end: OAuth flows over plain httpx2, its MCP server through the SDK client."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization  # noqa: TID251  # test key pairs for private_key_jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: TID251  # (no sealing involved)
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from pydantic import AnyUrl

from tests.support.oauth_server import OAuthTestServer

REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: redirects are read, not followed
SERVICE_SECRET = "svc-secret-" + "7" * 24


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(location).query).items()}


def register(http: httpx2.Client, server: OAuthTestServer, **metadata: Any) -> dict[str, Any]:
    body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none", "client_name": "latchkey", **metadata}
    response = http.post(server.issuer + "/register", json=body)
    assert response.status_code == 201, response.text
    client: dict[str, Any] = response.json()
    return client


def authorize_url(server: OAuthTestServer, client_id: str, challenge: str | None, **extra: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "st-1"}
    if challenge is not None:
        params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
    params |= {"resource": server.url, **extra}
    return server.issuer + "/authorize?" + urlencode({k: v for k, v in params.items() if v != ""})


def code_for(http: httpx2.Client, server: OAuthTestServer, client_id: str, challenge: str, **extra: str) -> str:
    """Authorize (auto-approved) and return the code from the redirect."""
    response = http.get(authorize_url(server, client_id, challenge, **extra))
    assert response.status_code == 302, response.text
    params = query(response.headers["location"])
    assert response.headers["location"].startswith(REDIRECT) and params["state"] == "st-1", params
    assert params["iss"] == server.issuer
    return params["code"]


def exchange(
    http: httpx2.Client, server: OAuthTestServer, client_id: str, code: str, verifier: str | None, **extra: str
) -> httpx2.Response:
    form = {"grant_type": "authorization_code", "code": code, "client_id": client_id, "redirect_uri": REDIRECT}
    if verifier is not None:
        form["code_verifier"] = verifier
    form |= {"resource": server.url, **extra}
    return http.post(server.token_endpoint, data={k: v for k, v in form.items() if v != ""})


def tokens_for(http: httpx2.Client, server: OAuthTestServer, scope: str = "", resource: str = "") -> dict[str, Any]:
    """A public DCR client's whole authorization-code flow; returns the token response plus client_id."""
    client = register(http, server)
    verifier, challenge = pkce()
    code = code_for(http, server, client["client_id"], challenge, scope=scope, resource=resource or server.url)
    response = exchange(http, server, client["client_id"], code, verifier, resource=resource or server.url)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens | {"client_id": client["client_id"]}


def refresh(http: httpx2.Client, server: OAuthTestServer, client_id: str, token: str) -> httpx2.Response:
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id, "resource": server.url}
    return http.post(server.token_endpoint, data=form)


def mcp_post(
    http: httpx2.Client, server: OAuthTestServer, token: str | None, message: dict[str, Any]
) -> httpx2.Response:
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.post(server.url, json={"jsonrpc": "2.0", "id": 1, **message}, headers=headers)


def use_mcp(server: OAuthTestServer, token: str) -> tuple[list[str], str, str]:
    """Through the SDK client: the tool names, whoami's answer and an echo."""

    async def run() -> tuple[list[str], str, str]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=10) as http:
            streams: AbstractAsyncContextManager[Any]
            if server.transport == "sse":
                streams = sse_client(server.url, headers=headers, timeout=10)
            else:
                streams = streamable_http_client(server.url, http_client=http)
            async with Client(streams, cache=None) as client:
                names = sorted(t.name for t in (await client.list_tools()).tools)
                who = await client.call_tool("whoami", {})
                echoed = await client.call_tool("echo", {"text": "hi"})
                return names, who.structured_content["result"], echoed.structured_content["result"]

    return asyncio.run(run())


def call_admin(server: OAuthTestServer, token: str) -> str:
    async def run() -> str:
        async with (
            httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http,
            Client(streamable_http_client(server.url, http_client=http), cache=None) as client,
        ):
            result = await client.call_tool("admin_tool", {})
            return str(result.structured_content["result"])

    return asyncio.run(run())


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[OAuthTestServer]:
    with OAuthTestServer(auto_approve=True, preregistered={"svc": SERVICE_SECRET, "pub": None}) as server:
        yield server


@pytest.fixture
def server(oauth_server: OAuthTestServer) -> Iterator[OAuthTestServer]:
    oauth_server.auto_approve = True
    oauth_server.next_user = "alice"
    yield oauth_server
    oauth_server.auto_approve = True


@pytest.fixture
def http() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=10, follow_redirects=False) as client:
        yield client


def test_discovery_goes_from_the_401_to_the_resource_metadata_to_the_authorization_server(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    denied = mcp_post(http, server, None, {"method": "tools/list"})
    assert denied.status_code == 401
    prm_url = server.base_url + "/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{prm_url}"' in denied.headers["www-authenticate"]
    prm = http.get(prm_url).json()
    assert prm["resource"] == server.url
    assert prm["authorization_servers"] == [server.issuer] == [server.base_url]
    assert prm["scopes_supported"] == ["tools:read", "tools:call", "admin"]
    metadata = http.get(server.issuer + "/.well-known/oauth-authorization-server").json()
    assert metadata["issuer"] == server.issuer
    assert metadata["token_endpoint"] == server.token_endpoint
    assert metadata["registration_endpoint"] == server.issuer + "/register"
    assert metadata["revocation_endpoint"] == server.issuer + "/revoke"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert "client_credentials" in metadata["grant_types_supported"]
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    assert http.get(server.issuer + "/.well-known/openid-configuration").json() == metadata


def test_registration_authorization_and_exchange_give_a_token_the_mcp_server_takes(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    client = register(http, server)
    assert client.get("client_secret") is None
    assert server.registrations[-1] == {
        "client_id": client["client_id"],
        "client_name": "latchkey",
        "redirect_uris": [REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
        "scope": "tools:read tools:call",
    }
    verifier, challenge = pkce()
    code = code_for(http, server, client["client_id"], challenge)
    assert server.authorize_requests[-1] == {
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT,
        "scope": None,
        "resource": server.url,
        "code_challenge_method": "S256",
    }
    response = exchange(http, server, client["client_id"], code, verifier)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer" and tokens["scope"] == "tools:read tools:call"
    assert tokens["expires_in"] == 60 and tokens["refresh_token"]
    assert server.token_requests[-1] == {
        "grant_type": "authorization_code",
        "client_id": client["client_id"],
        "resource": server.url,
        "scope": None,
    }
    assert use_mcp(server, tokens["access_token"]) == (["admin_tool", "echo", "whoami"], "alice", "hi")
    assert server.bearer_seen[-1] == tokens["access_token"]
    assert {tokens["access_token"], tokens["refresh_token"], code, verifier} <= server.issued_values()
    # The records are for assertions in leak tests: they hold no value the server issued or saw.
    recorded = repr([server.token_requests, server.registrations, server.authorize_requests, server.revoked])
    assert not any(value in recorded for value in server.issued_values())


def test_a_confidential_registered_client_authenticates_with_its_secret(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    client = register(http, server, token_endpoint_auth_method="client_secret_basic")
    assert client["client_secret"] in server.issued_values()
    verifier, challenge = pkce()
    code = code_for(http, server, client["client_id"], challenge)
    without = exchange(http, server, client["client_id"], code, verifier)
    assert without.status_code == 401 and without.json()["error"] == "invalid_client"
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    basic = (client["client_id"], client["client_secret"])
    response = http.post(server.token_endpoint, data=form | {"resource": server.url}, auth=basic)
    assert response.status_code == 200, response.text
    assert server.token_requests[-1]["client_id"] == client["client_id"]


def test_the_consent_page_approves_for_the_user_typed_in_and_denies(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    server.auto_approve = False
    server.next_user = "carol"
    client = register(http, server)
    verifier, challenge = pkce()
    to_consent = http.get(authorize_url(server, client["client_id"], challenge))
    assert to_consent.status_code == 302
    consent_url = to_consent.headers["location"]
    assert consent_url.startswith(server.consent_url_prefix() + "?")
    page = http.get(consent_url)
    assert page.status_code == 200
    assert 'name="user" value="carol"' in page.text
    assert 'id="approve"' in page.text and 'id="deny"' in page.text and 'method="post"' in page.text
    request_id = query(consent_url)["request"]
    approved = http.post(server.consent_url_prefix(), data={"request": request_id, "user": "bob", "action": "approve"})
    assert approved.status_code == 302
    params = query(approved.headers["location"])
    assert params["state"] == "st-1"
    # The consent is single use.
    again = http.post(server.consent_url_prefix(), data={"request": request_id, "user": "bob", "action": "approve"})
    assert again.status_code == 400
    tokens = exchange(http, server, client["client_id"], params["code"], verifier).json()
    assert use_mcp(server, tokens["access_token"])[1] == "bob"

    _, challenge = pkce()
    consent_url = http.get(authorize_url(server, client["client_id"], challenge)).headers["location"]
    denied = http.post(server.consent_url_prefix(), data={"request": query(consent_url)["request"], "action": "deny"})
    params = query(denied.headers["location"])
    assert denied.headers["location"].startswith(REDIRECT)
    assert params["error"] == "access_denied" and params["state"] == "st-1" and "code" not in params


@pytest.mark.parametrize(
    ("method", "challenge"),
    [("plain", "p" * 43), ("", "p" * 43), ("S256", "")],
    ids=["plain", "no-method", "no-challenge"],
)
def test_authorization_needs_pkce_s256(
    server: OAuthTestServer, http: httpx2.Client, method: str, challenge: str
) -> None:
    client = register(http, server)
    url = authorize_url(server, client["client_id"], None, code_challenge=challenge, code_challenge_method=method)
    response = http.get(url)
    assert response.status_code == 302
    params = query(response.headers["location"])
    assert params["error"] == "invalid_request" and "code" not in params


def test_the_code_needs_its_verifier_and_is_single_use(server: OAuthTestServer, http: httpx2.Client) -> None:
    client = register(http, server)
    verifier, challenge = pkce()
    code = code_for(http, server, client["client_id"], challenge)
    missing = exchange(http, server, client["client_id"], code, None)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    wrong = exchange(http, server, client["client_id"], code, pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    good = exchange(http, server, client["client_id"], code, verifier)
    assert good.status_code == 200
    replayed = exchange(http, server, client["client_id"], code, verifier)
    assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"
    # A replayed code revokes what it was exchanged for (RFC 6749 §4.1.2).
    assert mcp_post(http, server, good.json()["access_token"], {"method": "tools/list"}).status_code == 401


def test_a_token_for_another_resource_or_none_is_refused(server: OAuthTestServer, http: httpx2.Client) -> None:
    other = tokens_for(http, server, resource="http://127.0.0.1:9/mcp")
    assert server.token_requests[-1]["resource"] == "http://127.0.0.1:9/mcp"
    response = mcp_post(http, server, other["access_token"], {"method": "tools/list"})
    assert response.status_code == 401
    assert "resource_metadata=" in response.headers["www-authenticate"]

    client = register(http, server)
    verifier, challenge = pkce()
    code = code_for(http, server, client["client_id"], challenge, resource="")
    unbound = exchange(http, server, client["client_id"], code, verifier, resource="").json()
    assert mcp_post(http, server, unbound["access_token"], {"method": "tools/list"}).status_code == 401

    # A token request may not name another resource than the one authorized (RFC 8707).
    code = code_for(http, server, client["client_id"], challenge)
    switched = exchange(http, server, client["client_id"], code, verifier, resource="http://127.0.0.1:9/mcp")
    assert switched.status_code == 400 and switched.json()["error"] == "invalid_target"


def test_refresh_tokens_rotate_and_are_single_use(server: OAuthTestServer, http: httpx2.Client) -> None:
    tokens = tokens_for(http, server)
    server.expire_access_tokens()
    assert mcp_post(http, server, tokens["access_token"], {"method": "tools/list"}).status_code == 401
    redemptions, attempts = server.refresh_redemptions, server.refresh_attempts
    fresh = refresh(http, server, tokens["client_id"], tokens["refresh_token"])
    assert fresh.status_code == 200, fresh.text
    rotated = fresh.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert use_mcp(server, rotated["access_token"])[1] == "alice"
    reused = refresh(http, server, tokens["client_id"], tokens["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert (server.refresh_redemptions, server.refresh_attempts) == (redemptions + 1, attempts + 2)
    assert server.token_requests[-1]["grant_type"] == "refresh_token"

    server.revoke_refresh_tokens()
    revoked = refresh(http, server, tokens["client_id"], rotated["refresh_token"])
    assert revoked.status_code == 400 and revoked.json()["error"] == "invalid_grant"


def test_access_tokens_expire_after_their_ttl(http: httpx2.Client) -> None:
    with OAuthTestServer(auto_approve=True, access_token_ttl=1.0) as server:
        tokens = tokens_for(http, server)
        assert tokens["expires_in"] == 1
        assert mcp_post(http, server, tokens["access_token"], {"method": "ping"}).status_code != 401
        time.sleep(1.05)
        assert mcp_post(http, server, tokens["access_token"], {"method": "ping"}).status_code == 401


def test_revocation_of_a_refresh_token_ends_its_grant_and_of_an_access_token_only_that_token(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    tokens = tokens_for(http, server)
    revoked_before = len(server.revoked)
    form = {"token": tokens["access_token"], "client_id": tokens["client_id"]}
    gone = http.post(server.issuer + "/revoke", data=form)
    assert gone.status_code == 200
    assert mcp_post(http, server, tokens["access_token"], {"method": "tools/list"}).status_code == 401
    rotated = refresh(http, server, tokens["client_id"], tokens["refresh_token"]).json()
    form = {"token": rotated["refresh_token"], "token_type_hint": "refresh_token", "client_id": tokens["client_id"]}
    assert http.post(server.issuer + "/revoke", data=form).status_code == 200
    assert server.revoked[revoked_before:] == ["access", "refresh"]
    assert mcp_post(http, server, rotated["access_token"], {"method": "tools/list"}).status_code == 401
    again = refresh(http, server, tokens["client_id"], rotated["refresh_token"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_client_credentials_with_a_secret_in_the_body_or_basic(server: OAuthTestServer, http: httpx2.Client) -> None:
    form = {"grant_type": "client_credentials", "resource": server.url}
    posted = http.post(server.token_endpoint, data=form | {"client_id": "svc", "client_secret": SERVICE_SECRET})
    assert posted.status_code == 200, posted.text
    assert "refresh_token" not in posted.json()
    assert use_mcp(server, posted.json()["access_token"])[1] == "client:svc"
    basic = http.post(server.token_endpoint, data=form | {"scope": "tools:read"}, auth=("svc", SERVICE_SECRET))
    assert basic.status_code == 200 and basic.json()["scope"] == "tools:read"
    assert server.token_requests[-1] == {
        "grant_type": "client_credentials",
        "client_id": "svc",
        "resource": server.url,
        "scope": "tools:read",
    }
    wrong = http.post(server.token_endpoint, data=form, auth=("svc", "not-" + SERVICE_SECRET))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    public = http.post(server.token_endpoint, data=form | {"client_id": "pub"})
    assert public.status_code == 401
    assert SERVICE_SECRET in server.issued_values()


def test_a_preregistered_confidential_client_may_use_basic_for_the_code_flow(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    verifier, challenge = pkce()
    code = code_for(http, server, "svc", challenge)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    response = http.post(server.token_endpoint, data=form | {"resource": server.url}, auth=("svc", SERVICE_SECRET))
    assert response.status_code == 200, response.text
    revoke = {"token": response.json()["refresh_token"]}
    assert http.post(server.issuer + "/revoke", data=revoke, auth=("svc", SERVICE_SECRET)).status_code == 200
    assert server.revoked[-1] == "refresh"


def _pem(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_client_credentials_with_private_key_jwt(http: httpx2.Client) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    clients: dict[str, str | None] = {"rsa": _pem(rsa_key.public_key()), "ec": _pem(ec_key.public_key())}
    with OAuthTestServer(preregistered=clients) as server:

        def assertion(client_id: str, key: Any, algorithm: str, aud: str, jti: str | None = None) -> str:
            claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time()) + 60}
            return jwt.encode(claims | {"jti": jti or secrets.token_hex(8)}, key, algorithm=algorithm)

        def token(signed: str, client_id: str | None = None) -> httpx2.Response:
            form = {
                "grant_type": "client_credentials",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": signed,
                "resource": server.url,
            }
            return http.post(server.token_endpoint, data=form | ({"client_id": client_id} if client_id else {}))

        by_rsa = token(assertion("rsa", rsa_key, "RS256", server.token_endpoint), "rsa")
        assert by_rsa.status_code == 200, by_rsa.text
        assert use_mcp(server, by_rsa.json()["access_token"])[1] == "client:rsa"
        assert token(assertion("ec", ec_key, "ES256", server.issuer)).status_code == 200  # aud = issuer, no client_id
        assert token(assertion("ec", rsa_key, "RS256", server.issuer)).status_code == 401  # someone else's key
        assert token(assertion("rsa", rsa_key, "RS256", "http://127.0.0.1:9/token")).status_code == 401  # wrong aud
        signed = assertion("rsa", rsa_key, "RS256", server.token_endpoint, jti="once")
        assert token(signed).status_code == 200
        assert token(signed).status_code == 401  # a replayed assertion


def test_admin_tool_without_the_admin_scope_is_403_insufficient_scope(
    server: OAuthTestServer, http: httpx2.Client
) -> None:
    tokens = tokens_for(http, server)
    call = {"method": "tools/call", "params": {"name": "admin_tool", "arguments": {}}}
    response = mcp_post(http, server, tokens["access_token"], call)
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="insufficient_scope"')
    assert 'scope="tools:read tools:call admin"' in challenge
    assert f'resource_metadata="{server.base_url}/.well-known/oauth-protected-resource/mcp"' in challenge

    admin = tokens_for(http, server, scope="tools:read tools:call admin")
    assert admin["scope"] == "tools:read tools:call admin"
    assert call_admin(server, admin["access_token"]) == "admin ok"


def test_a_separate_authorization_server_over_sse_without_the_header_hint(http: httpx2.Client) -> None:
    with OAuthTestServer(
        transport="sse", auto_approve=True, separate_authorization_server=True, advertise_in_www_authenticate=False
    ) as server:
        assert server.url.endswith("/sse") and server.issuer != server.base_url
        denied = http.get(server.url, headers={"Accept": "text/event-stream"})
        assert denied.status_code == 401 and "resource_metadata" not in denied.headers["www-authenticate"]
        prm = http.get(server.base_url + "/.well-known/oauth-protected-resource/sse").json()
        assert prm["authorization_servers"] == [server.issuer] and prm["resource"] == server.url
        assert http.get(server.base_url + "/.well-known/oauth-authorization-server").status_code == 404
        assert http.get(server.issuer + "/.well-known/oauth-authorization-server").json()["issuer"] == server.issuer
        tokens = tokens_for(http, server)
        assert use_mcp(server, tokens["access_token"]) == (["admin_tool", "echo", "whoami"], "alice", "hi")


def test_without_dynamic_registration_a_preregistered_public_client_still_signs_in(http: httpx2.Client) -> None:
    with OAuthTestServer(
        auto_approve=True, dynamic_registration=False, revocation=False, preregistered={"app": None}
    ) as server:
        metadata = http.get(server.issuer + "/.well-known/oauth-authorization-server").json()
        assert "registration_endpoint" not in metadata and "revocation_endpoint" not in metadata
        assert http.post(server.issuer + "/register", json={"redirect_uris": [REDIRECT]}).status_code == 404
        verifier, challenge = pkce()
        code = code_for(http, server, "app", challenge)
        tokens = exchange(http, server, "app", code, verifier).json()
        assert use_mcp(server, tokens["access_token"])[1] == "alice"


def test_only_one_of_two_racing_refreshes_of_one_token_wins(http: httpx2.Client) -> None:
    with OAuthTestServer(auto_approve=True, token_endpoint_delay=0.3) as server:
        tokens = tokens_for(http, server)
        results: list[int] = []

        def redeem() -> None:
            with httpx2.Client(timeout=10) as own:
                results.append(refresh(own, server, tokens["client_id"], tokens["refresh_token"]).status_code)

        threads = [threading.Thread(target=redeem) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(results) == [200, 400]
        assert (server.refresh_redemptions, server.refresh_attempts) == (1, 2)


class _MemoryStorage:
    """The SDK client's TokenStorage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def test_the_sdk_oauth_client_finds_registers_and_signs_in_on_its_own(server: OAuthTestServer) -> None:
    """The reference client (mcp.client.auth) goes from a bare 401 to a working session: the server is spec-shaped."""
    redirected: list[str] = []

    async def run() -> str:
        async def on_redirect(url: str) -> None:
            async with httpx2.AsyncClient(follow_redirects=False) as plain:
                redirected.append((await plain.get(url)).headers["location"])

        async def on_callback() -> AuthorizationCodeResult:
            params = query(redirected[-1])
            return AuthorizationCodeResult(code=params["code"], state=params.get("state"), iss=params.get("iss"))

        auth = OAuthClientProvider(
            server.url,
            OAuthClientMetadata(redirect_uris=[AnyUrl(REDIRECT)], token_endpoint_auth_method="none"),
            _MemoryStorage(),
            redirect_handler=on_redirect,
            callback_handler=on_callback,
        )
        async with (
            httpx2.AsyncClient(auth=auth, timeout=10) as http,
            Client(streamable_http_client(server.url, http_client=http), cache=None) as client,
        ):
            return str((await client.call_tool("whoami", {})).structured_content["result"])

    requests_before = len(server.authorize_requests)
    assert asyncio.run(run()) == "alice"
    assert len(redirected) == 1
    made = server.authorize_requests[requests_before:]
    assert [(r["resource"], r["code_challenge_method"]) for r in made] == [(server.url, "S256")]
