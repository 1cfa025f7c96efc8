"""The secrets API: metadata, versions, ETags, names, sizes, references."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from app.models import McpServer, Provider, Secret
from app.secrets.sealing import open_sealed, secret_context
from tests.support.factories import Caller, Factory
from tests.support.statements import recorded_statements


def test_create_returns_metadata_at_version_1_and_never_the_value(admin: Caller, org: str) -> None:
    resp = admin.post(
        f"orgs/{org}/secrets",
        json={
            "name": "OPENAI_KEY",
            "value": "sk-live-abcdefghijklmnop1234",
            "description": "prod key",
            "allowed_hosts": ["API.openai.com"],
        },
    )
    assert resp.status_code == 201
    body = resp.get_json()
    assert body["version"] == 1
    assert body["name"] == "OPENAI_KEY"
    assert body["value_hint"] == "1234"
    assert body["allowed_hosts"] == ["api.openai.com"]
    assert body["used_by"] == []
    assert resp.headers["ETag"] == '"1"'
    assert "value" not in body and "ciphertext" not in body
    assert "sk-live" not in resp.get_data(as_text=True)


def test_short_values_have_no_hint(admin: Caller, org: str, factory: Factory) -> None:
    assert factory.secret(admin, org, value="x" * 19)["value_hint"] is None
    assert factory.secret(admin, org, value="y" * 20)["value_hint"] == "yyyy"


def test_stored_ciphertext_opens_only_under_its_binding(admin: Caller, org: str, factory: Factory, db, keyring) -> None:
    created = factory.secret(admin, org, value="the-plain-value")
    with db.session() as s:
        row = s.get(Secret, created["id"])
        assert row is not None and row.ciphertext is not None
        assert b"the-plain-value" not in row.ciphertext
        # After the contract migration there is no plaintext column at all.
        assert "value" not in {c["name"] for c in sa.inspect(s.connection()).get_columns("secrets")}
        opened = open_sealed(keyring, row.ciphertext, secret_context(row.org_id, row.id, 1))
    assert opened == b"the-plain-value"


def test_member_lists_and_gets_metadata(admin: Caller, member: Caller, org: str, factory: Factory) -> None:
    created = factory.secret(admin, org)
    listing = member.get(f"orgs/{org}/secrets")
    assert listing.status_code == 200
    assert [s["id"] for s in listing.get_json()["items"]] == [created["id"]]
    one = member.get(f"orgs/{org}/secrets/{created['id']}")
    assert one.status_code == 200 and one.headers["ETag"] == '"1"'


def test_patch_value_bumps_version_and_sets_rotated_at(admin: Caller, org: str, factory: Factory, db, keyring) -> None:
    created = factory.secret(admin, org, value="first-value")
    resp = admin.patch(f"orgs/{org}/secrets/{created['id']}", json={"value": "second-value"})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["version"] == 2 and body["rotated_at"] is not None
    assert resp.headers["ETag"] == '"2"'
    with db.session() as s:
        row = s.get(Secret, created["id"])
        assert row is not None and row.ciphertext is not None
        assert open_sealed(keyring, row.ciphertext, secret_context(row.org_id, row.id, 2)) == b"second-value"


def test_patch_without_value_keeps_version(admin: Caller, org: str, factory: Factory) -> None:
    created = factory.secret(admin, org)
    resp = admin.patch(
        f"orgs/{org}/secrets/{created['id']}",
        json={"name": "RENAMED", "description": "d", "allowed_hosts": ["*.example.com"]},
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert (body["version"], body["name"], body["description"], body["allowed_hosts"]) == (
        1,
        "RENAMED",
        "d",
        ["*.example.com"],
    )
    assert body["rotated_at"] is None


def test_an_edit_sends_one_query_for_its_users_and_one_to_clear_its_outbox_row(
    admin: Caller, org: str, factory: Factory
) -> None:
    # An edit's round trips are its latency under load (bench/many_workers.py): the secret's
    # users in one query (not one per kind of user), the outbox row removed in one statement
    # on an autocommit connection (not a transaction of its own).
    created = factory.secret(admin, org, name="ROUND_TRIPS")
    with recorded_statements(sa.Engine) as sent:
        assert admin.patch(f"orgs/{org}/secrets/{created['id']}", json={"value": "a-new-value-0123"}).status_code == 200
    users = [s for s in sent if "FROM providers" in s or "FROM mcp_server" in s]
    assert len(users) == 1 and "UNION ALL" in users[0]
    assert len([s for s in sent if s.lstrip().startswith("DELETE FROM cache_invalidations")]) == 1


def test_if_match_mismatch_is_412_and_changes_nothing(admin: Caller, org: str, factory: Factory) -> None:
    created = factory.secret(admin, org)
    resp = admin.patch(f"orgs/{org}/secrets/{created['id']}", json={"value": "new"}, headers={"If-Match": '"7"'})
    assert resp.status_code == 412
    assert resp.get_json()["code"] == "version_mismatch"
    assert admin.get(f"orgs/{org}/secrets/{created['id']}").get_json()["version"] == 1
    ok = admin.patch(f"orgs/{org}/secrets/{created['id']}", json={"value": "new"}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200 and ok.get_json()["version"] == 2


@pytest.mark.parametrize("header", ['W/"9"', "garbage", '""'])
def test_unparseable_or_weak_if_match_never_matches(admin: Caller, org: str, factory: Factory, header: str) -> None:
    created = factory.secret(admin, org)
    resp = admin.patch(f"orgs/{org}/secrets/{created['id']}", json={"value": "v"}, headers={"If-Match": header})
    assert resp.status_code == 412


def test_duplicate_name_is_409(admin: Caller, org: str, factory: Factory) -> None:
    factory.secret(admin, org, name="DUP")
    resp = admin.post(f"orgs/{org}/secrets", json={"name": "DUP", "value": "v"})
    assert resp.status_code == 409 and resp.get_json()["code"] == "conflict"
    other = factory.secret(admin, org, name="OTHER")
    renamed = admin.patch(f"orgs/{org}/secrets/{other['id']}", json={"name": "DUP"})
    assert renamed.status_code == 409


def test_same_name_in_two_orgs_is_fine(admin: Caller, org: str, factory: Factory) -> None:
    other_org = factory.org("other")
    other_admin = factory.user(other_org, "admin")
    factory.secret(admin, org, name="SHARED_NAME")
    factory.secret(other_admin, other_org, name="SHARED_NAME")


def test_delete_then_404(admin: Caller, org: str, factory: Factory) -> None:
    created = factory.secret(admin, org)
    assert admin.delete(f"orgs/{org}/secrets/{created['id']}").status_code == 204
    assert admin.get(f"orgs/{org}/secrets/{created['id']}").status_code == 404
    assert admin.delete(f"orgs/{org}/secrets/{created['id']}").status_code == 404


def test_delete_while_referenced_is_409_listing_users(admin: Caller, org: str, factory: Factory, db) -> None:
    created = factory.secret(admin, org)
    with db.session() as s:
        org_id = s.get(Secret, created["id"]).org_id  # type: ignore[union-attr]
        s.add(
            McpServer(
                id="mcp-1", org_id=org_id, name="Files", url="https://mcp.example.com/mcp", secret_ref=created["id"]
            )
        )
        s.add(
            Provider(
                id="prov-1",
                org_id=org_id,
                name="OpenAI",
                provider_type="openai",
                kind="openai",
                model_id="gpt-5",
                config={},
                secret_ref=created["id"],
            )
        )
    resp = admin.delete(f"orgs/{org}/secrets/{created['id']}")
    assert resp.status_code == 409
    body = resp.get_json()
    assert body["code"] == "secret_in_use"
    assert sorted((u["type"], u["id"], u["name"]) for u in body["used_by"]) == [
        ("mcp_server", "mcp-1", "Files"),
        ("provider", "prov-1", "OpenAI"),
    ]
    listed = admin.get(f"orgs/{org}/secrets/{created['id']}").get_json()
    assert {u["id"] for u in listed["used_by"]} == {"mcp-1", "prov-1"}
    with db.session() as s:
        assert s.get(Secret, created["id"]) is not None


def test_pagination_walks_every_secret_once(admin: Caller, org: str, factory: Factory) -> None:
    ids = [factory.secret(admin, org, name=f"S{i}")["id"] for i in range(7)]
    seen, cursor = [], None
    while True:
        resp = admin.get(f"orgs/{org}/secrets?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert resp.status_code == 200
        page = resp.get_json()
        assert len(page["items"]) <= 3
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=abc", "cursor=%%%", "cursor=bm9wZQ", "bogus=1"])
def test_bad_list_parameters_are_client_errors(admin: Caller, org: str, query: str) -> None:
    resp = admin.get(f"orgs/{org}/secrets?{query}")
    assert resp.status_code in (400, 422)
    assert resp.content_type == "application/problem+json"
    assert resp.get_json()["code"] in ("validation_error", "invalid_cursor")


def test_idempotency_key_replays_the_first_result(admin: Caller, org: str, db) -> None:
    body = {"name": "IDEMP", "value": "v1"}
    first = admin.post(f"orgs/{org}/secrets", json=body, headers={"Idempotency-Key": "k-1"})
    again = admin.post(f"orgs/{org}/secrets", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert first.get_json() == again.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    with db.session() as s:
        assert len(s.scalars(select(Secret).where(Secret.name == "IDEMP")).all()) == 1


def test_idempotency_key_with_another_body_is_422(admin: Caller, org: str) -> None:
    admin.post(f"orgs/{org}/secrets", json={"name": "A1", "value": "v"}, headers={"Idempotency-Key": "k-2"})
    resp = admin.post(f"orgs/{org}/secrets", json={"name": "A2", "value": "v"}, headers={"Idempotency-Key": "k-2"})
    assert resp.status_code == 422 and resp.get_json()["code"] == "idempotency_key_reused"


def test_idempotency_keys_are_per_user(admin: Caller, org: str, factory: Factory) -> None:
    other = factory.user(org, "admin")
    assert (
        admin.post(
            f"orgs/{org}/secrets", json={"name": "B1", "value": "v"}, headers={"Idempotency-Key": "same"}
        ).status_code
        == 201
    )
    resp = other.post(f"orgs/{org}/secrets", json={"name": "B2", "value": "v"}, headers={"Idempotency-Key": "same"})
    assert resp.status_code == 201 and resp.get_json()["name"] == "B2"


def test_request_id_is_echoed_or_generated(admin: Caller, org: str) -> None:
    assert admin.get(f"orgs/{org}/secrets", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = admin.get(f"orgs/{org}/secrets", headers={"X-Request-ID": "bad id with spaces"})
    assert generated.headers["X-Request-ID"] not in ("", "bad id with spaces")


def test_api_responses_are_not_cacheable(admin: Caller, org: str) -> None:
    assert admin.get(f"orgs/{org}/secrets").headers["Cache-Control"] == "no-store"
