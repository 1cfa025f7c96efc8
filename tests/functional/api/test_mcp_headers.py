"""MCP server header credentials through the API: create, replace, clear, refusals, tenancy, secrets in use."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.factories import Caller, Factory

URL = "https://mcp.example.com/mcp"
VALUE = "hdr-SECRET-value-7f3a9c"


def _header(ref: str, name: str = "X-API-Key", value: str = "{{secret}}") -> dict[str, str]:
    return {"name": name, "template": value, "secret_ref": ref}


def _create(caller: Caller, org: str, **body: Any) -> Any:
    return caller.post(f"orgs/{org}/mcp-servers", json={"name": "Headers", "url": URL, **body})


def _fields(resp: Any) -> dict[str, str]:
    assert resp.status_code == 422, (resp.status_code, resp.get_json())
    assert resp.mimetype == "application/problem+json"
    problem: dict[str, Any] = resp.get_json()
    assert problem["code"] == "validation_error"
    return {e["field"]: e["message"] for e in problem["errors"]}


def test_headers_are_created_replaced_and_cleared(admin: Caller, member: Caller, org: str, factory: Factory) -> None:
    key = factory.secret(admin, org, name="API_KEY", value=VALUE)["id"]
    tok = factory.secret(admin, org, name="GH_TOKEN", value=VALUE + "-2")["id"]
    resp = _create(admin, org, headers=[_header(key), _header(tok, "Authorization", "token {{secret}}")])
    assert resp.status_code == 201, resp.get_json()
    created = resp.get_json()
    assert created["headers"] == [
        {"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key},
        {"name": "Authorization", "template": "token {{secret}}", "secret_ref": tok},
    ]
    assert created["secret_ref"] is None and created["job"]["kind"] == "mcp.validate_server"
    assert VALUE not in resp.get_data(as_text=True)
    # Members read them (never a value: the template holds only the placeholder).
    assert member.get(f"orgs/{org}/mcp-servers/{created['id']}").get_json()["headers"] == created["headers"]

    path = f"orgs/{org}/mcp-servers/{created['id']}"
    replaced = admin.patch(path, json={"headers": [_header(tok, "x-token")]})
    assert replaced.status_code == 200, replaced.get_json()
    assert replaced.get_json()["headers"] == [{"name": "x-token", "template": "{{secret}}", "secret_ref": tok}]
    assert replaced.get_json()["job"] is not None  # a header change re-queues validation
    # A rename alone leaves the headers (and the validation) alone.
    renamed = admin.patch(path, json={"name": "Renamed"}).get_json()
    assert renamed["headers"] == replaced.get_json()["headers"] and renamed["job"] is None
    cleared = admin.patch(path, json={"headers": []})
    assert cleared.status_code == 200 and cleared.get_json()["headers"] == []
    assert _fields(admin.patch(path, json={"headers": None})) == {
        "headers": "must be a list of headers ([] removes every header)"
    }
    # A server without headers says so: an empty list.
    plain = _create(admin, org).get_json()
    assert plain["headers"] == []


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"name": "Host"}, "headers.0.name"),
        ({"name": "x-forwarded-for"}, "headers.0.name"),
        ({"name": "Sec-WebSocket-Key"}, "headers.0.name"),
        ({"name": "Mcp-Session-Id"}, "headers.0.name"),
        ({"name": "X Key"}, "headers.0.name"),
        ({"name": "X-Key:"}, "headers.0.name"),
        ({"template": "no placeholder"}, "headers.0.template"),
        ({"template": "{{secret}}{{secret}}"}, "headers.0.template"),
        ({"template": "{{secret}}\r\nX-Injected: 1"}, "headers.0.template"),
        ({"template": "x" * 1001 + "{{secret}}"}, "headers.0.template"),
        ({"secret_ref": None}, "headers.0.secret_ref"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_invalid_headers_are_422_on_the_field(
    admin: Caller, org: str, factory: Factory, header: dict[str, Any], field: str
) -> None:
    key = factory.secret(admin, org)["id"]
    errors = _fields(_create(admin, org, headers=[{**_header(key), **header}]))
    assert list(errors) == [field]
    assert "X-Injected" not in errors[field]  # messages never quote a submitted value


def test_header_sets_are_refused_whole(admin: Caller, org: str, factory: Factory) -> None:
    key = factory.secret(admin, org)["id"]
    too_many = [_header(key, f"X-Key-{i}") for i in range(9)]
    assert list(_fields(_create(admin, org, headers=too_many))) == ["headers"]
    twice = [_header(key, "X-Key"), _header(key, "x-key")]
    assert list(_fields(_create(admin, org, headers=twice))) == ["headers.1.name"]
    # Authorization is what secret_ref is sent as: not both.
    both = _fields(_create(admin, org, secret_ref=key, headers=[_header(key, "Authorization", "token {{secret}}")]))
    assert list(both) == ["headers.0.name"] and "secret_ref" in both["headers.0.name"]
    extra = _fields(_create(admin, org, headers=[{**_header(key), "extra": 1}]))
    assert extra == {"headers.0.extra": "unknown field"}


def test_a_member_cannot_bind_a_header_secret(admin: Caller, member: Caller, org: str, factory: Factory) -> None:
    key = factory.secret(admin, org)["id"]
    resp = _create(member, org, headers=[_header(key)])
    assert resp.status_code == 403 and resp.get_json()["code"] == "forbidden"
    server = _create(member, org).get_json()  # without a secret, a member may add a server
    patched = member.patch(f"orgs/{org}/mcp-servers/{server['id']}", json={"headers": [_header(key)]})
    assert patched.status_code == 403
    # and once an admin bound one, the member can neither move, strip nor delete the server.
    bound = _create(admin, org, headers=[_header(key)]).get_json()
    path = f"orgs/{org}/mcp-servers/{bound['id']}"
    assert member.patch(path, json={"url": "https://elsewhere.example.com/mcp"}).status_code == 403
    assert member.patch(path, json={"headers": []}).status_code == 403
    assert member.delete(path).status_code == 403
    assert admin.get(path).get_json()["headers"] == bound["headers"]


def test_another_orgs_secret_in_a_header_gets_the_answer_secret_ref_gets(
    admin: Caller, org: str, factory: Factory
) -> None:
    other = factory.org()
    other_admin = factory.user(other, "admin")
    theirs = factory.secret(other_admin, other)["id"]
    as_ref = _fields(_create(admin, org, secret_ref=theirs))
    as_header = _fields(_create(admin, org, headers=[_header(theirs)]))
    missing = _fields(_create(admin, org, headers=[_header("00000000-0000-7000-8000-00000000dead")]))
    assert as_header == {"headers.0.secret_ref": as_ref["secret_ref"]} == missing


def test_a_secret_used_by_a_header_cannot_be_deleted(admin: Caller, org: str, factory: Factory) -> None:
    key = factory.secret(admin, org, name="IN_HEADER")["id"]
    server = _create(admin, org, headers=[_header(key), _header(key, "X-Again", "again {{secret}}")]).get_json()
    used_by = admin.get(f"orgs/{org}/secrets/{key}").get_json()["used_by"]
    assert used_by == [{"type": "mcp_server", "id": server["id"], "name": "Headers"}]  # once, for two headers
    resp = admin.delete(f"orgs/{org}/secrets/{key}")
    assert resp.status_code == 409 and resp.get_json()["code"] == "secret_in_use"
    assert admin.patch(f"orgs/{org}/mcp-servers/{server['id']}", json={"headers": []}).status_code == 200
    assert admin.delete(f"orgs/{org}/secrets/{key}").status_code == 204
    # Deleting the server (an admin's) frees its header secrets too.
    other = factory.secret(admin, org)["id"]
    server = _create(admin, org, headers=[_header(other)]).get_json()
    assert admin.delete(f"orgs/{org}/secrets/{other}").status_code == 409
    assert admin.delete(f"orgs/{org}/mcp-servers/{server['id']}").status_code == 204
    assert admin.delete(f"orgs/{org}/secrets/{other}").status_code == 204


def test_the_openapi_document_describes_headers(client: Any) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    schemas = doc["components"]["schemas"]
    header_in = schemas["HeaderIn"]
    assert set(header_in["properties"]) == {"name", "template", "secret_ref"}
    assert header_in["additionalProperties"] is False
    for model in ("McpServerCreate", "McpServerUpdate"):
        field = schemas[model]["properties"]["headers"]
        listed = next(option for option in field["anyOf"] if option.get("type") == "array")
        assert listed["maxItems"] == 8 and listed["items"] == {"$ref": "#/components/schemas/HeaderIn"}
    out = schemas["McpServerOut"]
    assert "headers" in out["required"]
    assert out["properties"]["headers"]["items"] == {"$ref": "#/components/schemas/HeaderOut"}
    assert set(schemas["HeaderOut"]["properties"]) == {"name", "template", "secret_ref"}
