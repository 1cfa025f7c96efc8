"""The provider catalog: types and their fields, same-org secrets, admin-only mutations."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from app.models import Agent, AuditEvent
from tests.support.factories import Caller, Factory


@pytest.fixture
def key(factory: Factory, admin: Caller, org: str) -> str:
    return factory.secret(admin, org, name="PROVIDER_KEY", value="sk-provider-key-" + "k" * 20)["id"]


def _create(caller: Caller, org: str, **body: Any) -> Any:
    return caller.post(f"orgs/{org}/providers", json=body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"provider_type": "openai", "model_id": "gpt-5.2"}, ("openai", "openai/gpt-5.2", {})),
        (
            {"provider_type": "anthropic", "model_id": "claude-x", "config": {"base_url": "https://proxy.test/"}},
            ("anthropic", "anthropic/claude-x", {"base_url": "https://proxy.test"}),
        ),
        (
            {
                "provider_type": "openai_compatible",
                "kind": "mistral",
                "model_id": "large",
                "config": {"base_url": "https://llm.internal.test/v1"},
            },
            ("mistral", "mistral/large", {"base_url": "https://llm.internal.test/v1"}),
        ),
        (
            {
                "provider_type": "cloudflare_ai_gateway",
                "kind": "openai",
                "model_id": "gpt-5.2",
                "config": {"account_id": "acc123", "gateway_id": "gw-1"},
            },
            ("openai", "openai/gpt-5.2", {"account_id": "acc123", "gateway_id": "gw-1"}),
        ),
    ],
    ids=["openai", "anthropic", "openai_compatible", "gateway"],
)
def test_each_type_is_created_with_its_fields(
    admin: Caller, org: str, key: str, body: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    resp = _create(admin, org, name="P", secret_ref=key, **body)
    assert resp.status_code == 201, resp.get_json()
    out = resp.get_json()
    assert (out["kind"], out["model_path"], out["config"]) == expected
    assert out["secret_ref"] == key
    assert "sk-provider" not in resp.get_data(as_text=True)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider_type": "openai", "model_id": "m"}, "secret_ref"),
        ({"provider_type": "bogus", "model_id": "m", "secret_ref": "{key}"}, "provider_type"),
        ({"provider_type": "openai", "kind": "anthropic", "model_id": "m", "secret_ref": "{key}"}, "kind"),
        (
            {"provider_type": "openai_compatible", "kind": "x", "model_id": "m", "secret_ref": "{key}"},
            "config.base_url",
        ),
        (
            {
                "provider_type": "openai_compatible",
                "model_id": "m",
                "secret_ref": "{key}",
                "config": {"base_url": "https://x.test"},
            },
            "kind",
        ),
        (
            {
                "provider_type": "cloudflare_ai_gateway",
                "kind": "openai",
                "model_id": "m",
                "secret_ref": "{key}",
                "config": {"account_id": "a"},
            },
            "config.gateway_id",
        ),
        (
            {"provider_type": "openai", "model_id": "m", "secret_ref": "{key}", "config": {"token": "raw"}},
            "config.token",
        ),
        (
            {
                "provider_type": "openai",
                "model_id": "m",
                "secret_ref": "{key}",
                "config": {"base_url": "https://user:pw@x.test"},
            },
            "config.base_url",
        ),
        ({"provider_type": "openai", "model_id": "m", "secret_ref": "no-such-secret"}, "secret_ref"),
        ({"provider_type": "openai", "model_id": "", "secret_ref": "{key}"}, "model_id"),
    ],
)
def test_invalid_bodies_are_422_on_the_field(
    admin: Caller, org: str, key: str, body: dict[str, Any], field: str
) -> None:
    body = {k: (v.format(key=key) if isinstance(v, str) else v) for k, v in body.items()}
    resp = _create(admin, org, name="P", **body)
    assert resp.status_code == 422, resp.get_json()
    assert field in [e["field"] for e in resp.get_json()["errors"]]


def test_a_secret_of_another_org_is_422(admin: Caller, org: str, factory: Factory) -> None:
    other = factory.org()
    foreign = factory.secret(factory.user(other, "admin"), other)["id"]
    resp = _create(admin, org, name="P", provider_type="openai", model_id="m", secret_ref=foreign)
    assert resp.status_code == 422 and resp.get_json()["errors"][0]["field"] == "secret_ref"


def test_several_entries_of_one_type_and_unique_names(admin: Caller, org: str, key: str) -> None:
    assert _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key).status_code == 201
    assert _create(admin, org, name="B", provider_type="openai", model_id="m", secret_ref=key).status_code == 201
    dup = _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key)
    assert dup.status_code == 409
    names = [p["name"] for p in admin.get(f"orgs/{org}/providers").get_json()["items"]]
    assert names == ["A", "B"]


def test_members_list_but_do_not_change(admin: Caller, member: Caller, org: str, key: str) -> None:
    pid = _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key).get_json()["id"]
    assert member.get(f"orgs/{org}/providers").status_code == 200
    assert member.get(f"orgs/{org}/providers/{pid}").status_code == 200
    assert _create(member, org, name="M", provider_type="openai", model_id="m", secret_ref=key).status_code == 403
    assert member.patch(f"orgs/{org}/providers/{pid}", json={"model_id": "other"}).status_code == 403
    assert member.delete(f"orgs/{org}/providers/{pid}").status_code == 403


def test_edit_rechecks_type_kind_and_config_together(admin: Caller, org: str, key: str, db: Any) -> None:
    pid = _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key).get_json()["id"]
    resp = admin.patch(f"orgs/{org}/providers/{pid}", json={"provider_type": "cloudflare_ai_gateway"})
    assert resp.status_code == 422  # the gateway needs a kind, an account and a gateway id
    resp = admin.patch(
        f"orgs/{org}/providers/{pid}",
        json={
            "provider_type": "cloudflare_ai_gateway",
            "kind": "anthropic",
            "config": {"account_id": "a1", "gateway_id": "g1"},
            "model_id": "claude-x",
        },
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["model_path"] == "anthropic/claude-x"
    with db.session() as s:
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.target_id == pid)).all()
        assert actions == ["provider.create", "provider.update"]


def test_the_secret_lists_its_providers_and_cannot_be_deleted(admin: Caller, org: str, key: str) -> None:
    pid = _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key).get_json()["id"]
    assert admin.get(f"orgs/{org}/secrets/{key}").get_json()["used_by"] == [
        {"type": "provider", "id": pid, "name": "A"}
    ]
    assert admin.delete(f"orgs/{org}/secrets/{key}").status_code == 409


def test_a_provider_used_by_an_agent_cannot_be_deleted(admin: Caller, org: str, key: str, db: Any) -> None:
    from app.db import new_id
    from app.identity import service as identity

    pid = _create(admin, org, name="A", provider_type="openai", model_id="m", secret_ref=key).get_json()["id"]
    with db.session() as s:
        s.add(Agent(id=new_id(), org_id=identity.get_org(s, org).id, name="Bot", provider_id=pid))
    resp = admin.delete(f"orgs/{org}/providers/{pid}")
    assert resp.status_code == 409 and resp.get_json()["code"] == "provider_in_use"
    assert [u["name"] for u in resp.get_json()["used_by"]] == ["Bot"]
    with db.session() as s:
        s.execute(Agent.__table__.delete())
    assert admin.delete(f"orgs/{org}/providers/{pid}").status_code == 204
