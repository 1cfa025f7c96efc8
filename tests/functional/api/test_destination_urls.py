"""Destination URLs and allowed_hosts entries: one set of rules (app.egress.urls), 422 never 500.

Through the API: MCP server url (create and edit), provider config.base_url, a secret's
allowed_hosts; and the model-API endpoint builder, which checks its base URLs the same way.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.agents.llm import ProviderError, endpoint_for
from app.egress.urls import UrlError, check_http_url, split_host_pattern
from tests.support.factories import Caller, Factory

TOKEN = "tok-IN-QUERY-5e8f0c"

# Each used to answer 500 (urlsplit raising ValueError) or to be stored as is.
BAD_URLS = [
    "https://[::1/x",
    "https://[::1",
    "http://[not-an-address]/mcp",
    "https://host:99999/mcp",
    "https://host:port/mcp",
    "https://ho st/mcp",
    "https://host/mc\x00p",
    "https://@host/mcp",
    f"https://user:{TOKEN}@host/mcp",
    "https:///mcp",
    "ftp://host/mcp",
    "https://host/mcp#frag",
]
CREDENTIAL_QUERIES = [
    f"https://mcp.example.com/mcp?access_token={TOKEN}",
    f"https://mcp.example.com/mcp?x=1&Token={TOKEN}",
    f"https://mcp.example.com/mcp?API-KEY={TOKEN}",
    f"https://mcp.example.com/mcp?key={TOKEN}",
    f"https://mcp.example.com/mcp?sig={TOKEN}",
    f"https://mcp.example.com/mcp?password={TOKEN}",
    f"https://mcp.example.com/mcp?%61uth={TOKEN}",
    # A server that splits pairs on ";" too reads access_token here.
    f"https://mcp.example.com/mcp?x=1;access_token={TOKEN}",
]


def _problem(resp: Any, field: str) -> dict[str, Any]:
    assert resp.status_code == 422, (resp.status_code, resp.get_data(as_text=True))
    problem: dict[str, Any] = resp.get_json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == [field]
    assert TOKEN not in resp.get_data(as_text=True)
    return problem


# --- the shared function --------------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_URLS + CREDENTIAL_QUERIES)
def test_check_http_url_refuses_with_a_message_that_never_quotes_the_url(url: str) -> None:
    with pytest.raises(UrlError) as info:
        check_http_url(url)
    assert TOKEN not in str(info.value) and "mcp.example.com" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://mcp.example.com/mcp",
        "http://127.0.0.1:8080/mcp",
        "https://[::1]:8443/mcp",
        "https://mcp.example.com/mcp?workspace=a&session_id=b",
        "https://bücher.example/mcp",
    ],
)
def test_check_http_url_accepts_plain_destinations(url: str) -> None:
    assert check_http_url(f"  {url} ") == url


def test_no_query_at_all_where_none_is_allowed() -> None:
    with pytest.raises(UrlError, match="query"):
        check_http_url("https://models.example/v1?region=eu", allow_query=False)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("api.example.com", ("api.example.com", None)),
        ("api.example.com:8443", ("api.example.com", 8443)),
        ("*.example.com:8443", ("*.example.com", 8443)),
        ("[::1]", ("[::1]", None)),
        ("[::1]:8443", ("[::1]", 8443)),
        ("::1", ("::1", None)),
    ],
)
def test_split_host_pattern(entry: str, expected: tuple[str, int | None]) -> None:
    assert split_host_pattern(entry) == expected


@pytest.mark.parametrize("entry", ["h:0", "h:65536", "h:x", "h:", "[::1", "[::1]8443", "[::1]:", "a:b:c"])
def test_split_host_pattern_refuses_bad_ports(entry: str) -> None:
    with pytest.raises(UrlError):
        split_host_pattern(entry)


# --- MCP servers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_URLS + CREDENTIAL_QUERIES)
def test_mcp_server_create_refuses_bad_and_credential_carrying_urls(admin: Caller, org: str, url: str) -> None:
    _problem(admin.post(f"orgs/{org}/mcp-servers", json={"name": "M", "url": url}), "url")


@pytest.mark.parametrize("url", ["https://[::1/x", CREDENTIAL_QUERIES[0]])
def test_mcp_server_edit_refuses_bad_and_credential_carrying_urls(admin: Caller, org: str, url: str) -> None:
    created = admin.post(f"orgs/{org}/mcp-servers", json={"name": "M", "url": "https://mcp.example.com/mcp"})
    assert created.status_code == 201, created.get_json()
    server = created.get_json()["id"]
    _problem(admin.patch(f"orgs/{org}/mcp-servers/{server}", json={"url": url}), "url")
    assert admin.get(f"orgs/{org}/mcp-servers/{server}").get_json()["url"] == "https://mcp.example.com/mcp"


def test_mcp_server_url_with_a_plain_query_is_kept(admin: Caller, org: str) -> None:
    url = "https://mcp.example.com/mcp?workspace=acme"
    created = admin.post(f"orgs/{org}/mcp-servers", json={"name": "M", "url": url})
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["url"] == url


# --- providers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [*BAD_URLS, CREDENTIAL_QUERIES[0], "https://models.example/v1?region=eu"])
def test_provider_base_url_refuses_bad_urls_and_any_query(factory: Factory, admin: Caller, org: str, url: str) -> None:
    key = factory.secret(admin, org, value="sk-provider-key-" + "k" * 20)["id"]
    body = {
        "name": "P",
        "provider_type": "openai_compatible",
        "kind": "mistral",
        "model_id": "large",
        "secret_ref": key,
        "config": {"base_url": url},
    }
    _problem(admin.post(f"orgs/{org}/providers", json=body), "config.base_url")


@pytest.mark.parametrize("url", ["https://[::1/x", f"https://models.example/v1?key={TOKEN}", "https://h:99999/v1"])
def test_the_endpoint_builder_refuses_the_same_urls(url: str) -> None:
    with pytest.raises(ProviderError) as info:
        endpoint_for(
            "openai_compatible",
            "mistral",
            "large",
            {"base_url": url},
            api_key="k",
            gateway_token=None,
            gateway_base_url="https://gateway.example/v1",
        )
    assert info.value.code == "provider_config_invalid"
    assert TOKEN not in info.value.message


# --- allowed_hosts --------------------------------------------------------------------------------


def test_allowed_hosts_accept_ports_and_ipv6_and_are_normalised(factory: Factory, admin: Caller, org: str) -> None:
    hosts = ["API.example.com:8443", "*.Example.com:443", "[0:0::1]:8443", "[::1]", "10.0.0.1:80", "api.example.com"]
    secret = factory.secret(admin, org, allowed_hosts=hosts)
    assert secret["allowed_hosts"] == [
        "api.example.com:8443",
        "*.example.com:443",
        "[::1]:8443",
        "[::1]",
        "10.0.0.1:80",
        "api.example.com",
    ]


@pytest.mark.parametrize(
    "entry", ["api.example.com:0", "api.example.com:65536", "api.example.com:https", "[::1", "[nope]:1", "::1:x", "*"]
)
def test_allowed_hosts_refuse_bad_ports_and_shapes(admin: Caller, org: str, entry: str) -> None:
    body = {"name": "S", "value": "v", "allowed_hosts": ["ok.example.com", entry]}
    _problem(admin.post(f"orgs/{org}/secrets", json=body), "allowed_hosts.1")
