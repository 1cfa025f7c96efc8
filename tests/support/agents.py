"""Agents and their providers made through the API, for tests that run them (worker or runner)."""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer

PROVIDER_KEY = "sk-provider-" + "p" * 30


def provider(
    admin: Caller,
    org: str,
    factory: Factory,
    llm: LlmTestServer,
    provider_type: str = "openai_compatible",
    key: str = PROVIDER_KEY,
) -> tuple[str, str]:
    """A provider of ``provider_type`` pointed at the model stand-in, its key in a new secret: (provider, secret)."""
    secret = factory.secret(admin, org, value=key)["id"]
    body: dict[str, Any] = {
        "name": f"P-{provider_type}-{uuid.uuid4().hex[:6]}",
        "provider_type": provider_type,
        "model_id": "test-model",
        "secret_ref": secret,
    }
    if provider_type == "openai_compatible":
        body |= {"kind": "openai", "config": {"base_url": llm.url + "/v1"}}
    elif provider_type in ("openai", "anthropic"):
        body["config"] = {"base_url": llm.url + ("/v1" if provider_type == "openai" else "")}
    else:
        body |= {"kind": "openai", "config": {"account_id": "acct1", "gateway_id": "gw1"}}
    resp = admin.post(f"orgs/{org}/providers", json=body)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"], secret


def agent(caller: Caller, org: str, provider_id: str, tools: list[dict[str, str]] | None = None) -> str:
    """An agent on ``provider_id`` with these tools; its id."""
    resp = caller.post(
        f"orgs/{org}/agents",
        json={"name": "Bot", "provider_id": provider_id, "system_prompt": "You are helpful.", "tools": tools or []},
    )
    assert resp.status_code == 201, resp.get_json()
    agent_id: str = resp.get_json()["id"]
    return agent_id
