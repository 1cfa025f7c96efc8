"""The MCP server form's header editor through the test client: rows in, errors next to their fields, admin only."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from tests.support.factories import Factory
from tests.support.web import client_sign_in, person

URL = "https://mcp.example.com/mcp"


def _form(csrf: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf, "name": "Hdr", "url": URL, "transport": "streamable_http", "secret_ref": "", **fields}


def _servers(caller: Any, org: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = caller.get(f"orgs/{org}/mcp-servers").get_json()["items"]
    return items


def test_an_admin_adds_headers_and_sees_them_on_the_detail_page(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    key = factory.secret(admin, org, name="API_KEY", value="hdr-ui-value-" + "v" * 20)["id"]
    csrf = client_sign_in(ui_client, admin.email)
    page = ui_client.get(f"/orgs/{org}/mcp-servers/new").get_data(as_text=True)
    assert "data-header-editor" in page and 'name="headers-0-name"' in page
    assert 'value="{{secret}}"' in page  # the value template comes prefilled

    # Row 0 is left blank (ignored); rows 3 and 5 are what a browser sends after removing rows.
    fields = {
        "headers-0-name": "",
        "headers-0-template": "{{secret}}",
        "headers-0-secret_ref": "",
        "headers-3-name": "X-API-Key",
        "headers-3-template": "{{secret}}",
        "headers-3-secret_ref": key,
        "headers-5-name": "Authorization",
        "headers-5-template": "token {{secret}}",
        "headers-5-secret_ref": key,
    }
    resp = ui_client.post(f"/orgs/{org}/mcp-servers/new", data=_form(csrf, **fields))
    assert resp.status_code == 302, resp.get_data(as_text=True)
    [server] = _servers(admin, org)
    assert [(h["name"], h["template"]) for h in server["headers"]] == [
        ("X-API-Key", "{{secret}}"),
        ("Authorization", "token {{secret}}"),
    ]
    detail = ui_client.get(resp.headers["Location"]).get_data(as_text=True)
    assert 'id="mcp-headers"' in detail and "<code>X-API-Key</code>" in detail and "API_KEY" in detail
    assert "hdr-ui-value" not in detail
    assert 'value="token {{secret}}"' in detail  # the edit form holds the rows

    # Saving the form without the rows removes them.
    resp = ui_client.post(resp.headers["Location"], data=_form(csrf))
    assert resp.status_code == 302
    assert _servers(admin, org)[0]["headers"] == []


def test_refusals_are_shown_next_to_the_row_they_belong_to(ui_client: FlaskClient, factory: Factory, org: str) -> None:
    admin = person(factory, org)
    key = factory.secret(admin, org)["id"]
    csrf = client_sign_in(ui_client, admin.email)
    fields = {
        "headers-2-name": "X-Fine",
        "headers-2-template": "{{secret}}",
        "headers-2-secret_ref": key,
        "headers-4-name": "Host",
        "headers-4-template": "no placeholder",
        "headers-4-secret_ref": key,
        "headers-7-name": "X-No-Secret",
        "headers-7-template": "{{secret}}",
        "headers-7-secret_ref": "",
    }
    resp = ui_client.post(f"/orgs/{org}/mcp-servers/new", data=_form(csrf, **fields))
    assert resp.status_code == 422
    page = resp.get_data(as_text=True)
    assert 'id="headers-4-name-error"' in page and "pick another header name" in page
    assert 'id="headers-4-template-error"' in page and "exactly once" in page
    assert 'id="headers-2-name-error"' not in page
    # The submitted rows come back as typed, so nothing is lost.
    assert 'value="X-Fine"' in page and 'value="no placeholder"' in page
    assert _servers(admin, org) == []
    # Once the row's name and value are fixed, the row without a secret is refused on its picker.
    fields |= {"headers-4-name": "X-Key", "headers-4-template": "k {{secret}}"}
    page = ui_client.post(f"/orgs/{org}/mcp-servers/new", data=_form(csrf, **fields)).get_data(as_text=True)
    assert 'id="headers-7-secret_ref-error"' in page


def test_a_member_gets_no_header_editor_and_cannot_bind_through_the_form(
    ui_client: FlaskClient, factory: Factory, org: str
) -> None:
    admin = person(factory, org)
    key = factory.secret(admin, org)["id"]
    member = person(factory, org, "member")
    csrf = client_sign_in(ui_client, member.email)
    page = ui_client.get(f"/orgs/{org}/mcp-servers/new").get_data(as_text=True)
    assert "data-header-editor" not in page
    fields = {"headers-0-name": "X-API-Key", "headers-0-template": "{{secret}}", "headers-0-secret_ref": key}
    resp = ui_client.post(f"/orgs/{org}/mcp-servers/new", data=_form(csrf, **fields))
    assert resp.status_code == 302
    [server] = _servers(admin, org)
    assert server["headers"] == []  # the member's form binds nothing
    # The detail page lists an admin's headers to members, read-only.
    admin.patch(
        f"orgs/{org}/mcp-servers/{server['id']}",
        json={"headers": [{"name": "X-API-Key", "template": "{{secret}}", "secret_ref": key}]},
    )
    detail = ui_client.get(f"/orgs/{org}/mcp-servers/{server['id']}").get_data(as_text=True)
    assert 'id="mcp-headers"' in detail and "data-header-editor" not in detail
