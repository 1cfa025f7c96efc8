"""The response size cap in a real worker: an oversized model reply fails the run, an oversized
tool result is a tool_error, both with the code ``response_too_large`` (LATCHKEY_MAX_RESPONSE_BYTES)."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from tests.e2e.workers.test_agents import _mcp, _run, mcp_server
from tests.support.agents import agent, provider
from tests.support.factories import Caller, Factory
from tests.support.llm_server import LlmTestServer
from tests.support.mcp_server import McpTestServer
from tests.support.workers import extra_worker

__all__ = ["mcp_server"]  # a fixture, reused from the agent tests

CAP = 64 * 1024


def _through(web: Any, caller: Caller) -> Caller:
    """The same user, calling the web app that publishes to the capped worker's queue."""
    return Caller(web.test_client(), caller.token, caller.user_id, caller.email)


def test_an_endless_model_reply_fails_the_run_with_response_too_large(
    settings: Settings, llm: LlmTestServer, admin: Caller, org: str, factory: Factory
) -> None:
    with extra_worker(settings, max_response_bytes=CAP) as (_producer, web):
        caller = _through(web, admin)
        provider_id, _ = provider(caller, org, factory, llm)
        llm.script([{"stream_bytes": 0}])  # never ends by itself
        run = _run(caller, org, agent(caller, org, provider_id))
    assert run["status"] == "failed", run
    assert run["error"]["code"] == "response_too_large"
    assert run["events"][-1]["type"] == "error" and run["events"][-1]["code"] == "response_too_large"
    [sent] = llm.streamed
    assert sent < 64 * 1024 * 1024  # the worker hung up near the cap, not at the stand-in's safety stop


def test_an_oversized_tool_result_is_a_tool_error_with_response_too_large(
    settings: Settings,
    llm: LlmTestServer,
    mcp_server: McpTestServer,
    admin: Caller,
    org: str,
    factory: Factory,
) -> None:
    with extra_worker(settings, max_response_bytes=CAP) as (_producer, web):
        caller = _through(web, admin)
        provider_id, _ = provider(caller, org, factory, llm)
        server_id = _mcp(caller, org, factory, mcp_server)  # its tools/list fits under the cap
        agent_id = agent(caller, org, provider_id, [{"mcp_server_id": server_id, "tool_name": "echo"}])
        # The model's tool call fits under the cap; the server's answer (the text as content and as
        # structured content) does not.
        text = "x" * (CAP * 3 // 4)
        llm.script([{"tool_calls": [{"name": "echo", "arguments": {"text": text}}]}, {"text": "ok"}])
        run = _run(caller, org, agent_id)
    assert run["status"] == "succeeded", (run["error"], run["events"])
    [error] = [e for e in run["events"] if e["type"] == "tool_error"]
    assert error["code"] == "response_too_large"
    assert run["output"] == "ok"
