"""The worker's OAuth helpers that need no server: resources, PKCE, the authorization URL, the choice of client."""

from __future__ import annotations

import base64
import hashlib
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from app.config import Settings
from app.mcp import authorization, oauth
from app.models import McpServer

AS = oauth.AuthServer(
    issuer="https://as.example.com",
    authorization_endpoint="https://as.example.com/authorize?tenant=1",
    token_endpoint="https://as.example.com/token",
)


@pytest.mark.parametrize(
    ("url", "resource"),
    [
        ("HTTPS://MCP.Example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://mcp.example.com/", "https://mcp.example.com"),
        ("https://mcp.example.com:8443/a/b?x=1#f", "https://mcp.example.com:8443/a/b"),
    ],
)
def test_the_resource_is_the_canonical_server_url(url: str, resource: str) -> None:
    assert oauth.canonical_resource(url) == resource


def test_metadata_may_name_the_server_or_a_path_above_it_on_its_origin_only() -> None:
    assert oauth._same_origin_parent("https://mcp.example.com/mcp", "https://mcp.example.com/mcp")
    assert oauth._same_origin_parent("https://mcp.example.com/", "https://mcp.example.com/mcp")
    assert not oauth._same_origin_parent("https://evil.example.com/mcp", "https://mcp.example.com/mcp")
    assert not oauth._same_origin_parent("https://mcp.example.com/other", "https://mcp.example.com/mcp")


def test_pkce_is_s256_of_a_fresh_verifier() -> None:
    verifier, challenge = oauth.pkce_pair()
    assert 43 <= len(verifier) <= 128 and verifier != oauth.pkce_pair()[0]
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == digest


def test_the_authorization_url_carries_pkce_state_resource_and_scopes() -> None:
    url = oauth.authorization_url(
        AS,
        oauth.OAuthClient("client-1"),
        redirect_uri="https://latchkey.example.com/oauth/callback",
        state="st",
        challenge="ch",
        resource="https://mcp.example.com/mcp",
        scopes=["a", "b"],
    )
    query = parse_qs(urlsplit(url).query)
    assert query["tenant"] == ["1"]  # the endpoint's own query is kept
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"] == ["ch"]
    assert query["resource"] == ["https://mcp.example.com/mcp"] and query["scope"] == ["a b"]
    assert query["state"] == ["st"] and query["response_type"] == ["code"]


def _ctx(public_url: str) -> SimpleNamespace:
    return SimpleNamespace(settings=Settings(env="test", public_url=public_url))


def _found(cimd: bool, registration: str | None = None) -> oauth.Discovery:
    server = oauth.AuthServer(
        issuer=AS.issuer,
        authorization_endpoint=AS.authorization_endpoint,
        token_endpoint=AS.token_endpoint,
        registration_endpoint=registration,
        client_id_metadata_documents=cimd,
    )
    return oauth.Discovery(resource="https://mcp.example.com/mcp", server=server)


def test_a_client_id_metadata_document_is_used_where_the_server_takes_one() -> None:
    server = McpServer(org_id="o", name="S", url="https://mcp.example.com/mcp", auth_type="oauth")
    client = authorization._client(_ctx("https://latchkey.example.com"), server, _found(True), None, [])  # type: ignore[arg-type]
    assert client.client_id == "https://latchkey.example.com/oauth/client-metadata.json"
    assert client.auth_method == "none" and client.secret is None


def test_without_metadata_documents_or_registration_connecting_says_to_configure_a_client() -> None:
    server = McpServer(org_id="o", name="S", url="https://mcp.example.com/mcp", auth_type="oauth")
    # A plain-http public URL cannot be a client id: registration is next, and there is none.
    with pytest.raises(oauth.OAuthError) as info:
        authorization._client(_ctx("http://127.0.0.1:5080"), server, _found(True), None, [])  # type: ignore[arg-type]
    assert info.value.code == "registration_failed" and "pre-registered client id" in info.value.message


def test_a_pre_registered_public_client_is_used_as_configured() -> None:
    server = McpServer(
        org_id="o", name="S", url="https://mcp.example.com/mcp", auth_type="oauth", oauth_client_id="registered"
    )
    client = authorization._client(_ctx("https://latchkey.example.com"), server, _found(True), None, [])  # type: ignore[arg-type]
    assert (client.client_id, client.auth_method, client.secret) == ("registered", "none", None)
