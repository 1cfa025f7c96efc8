"""app.agents.llm against a real model API stand-in (tests/support/llm_server.py) on 127.0.0.1.

Every flavour of provider is exercised on the wire: openai, openai_compatible and the Cloudflare AI
gateway (OpenAI format) and anthropic (Messages API). The stand-in requires the right key in the
right header (and the gateway token on the gateway route), so every successful call also proves the
credentials were sent where they belong; the recorded requests prove they went nowhere else.
"""

from __future__ import annotations

import json
import logging
import pickle
import secrets
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from app.agents.llm import (
    ANTHROPIC_VERSION,
    MESSAGES,
    Endpoint,
    Message,
    ModelTurn,
    ProviderError,
    ToolCall,
    ToolSpec,
    complete,
    endpoint_for,
)
from app.egress import EgressDeniedError, EgressPolicy, guarded_client
from tests.support.leaks import leak_forms
from tests.support.llm_server import ECHO_PREFIX, LlmTestServer, RecordedRequest, free_port

KEY = "sk-test-PROVIDER-" + secrets.token_hex(12)
GATEWAY_TOKEN = "cfaig-test-GATEWAY-" + secrets.token_hex(12)
BODY_MARKER = "BODY-MARKER-3c59dc04"  # text only the stand-in's error bodies contain
ACCOUNT = "0123456789abcdef0123456789abcdef"
GATEWAY = "latchkey-gw"

FLAVOURS = ("openai", "openai_compatible", "anthropic", "cloudflare_ai_gateway")
LOCAL = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}))

ADD = ToolSpec(
    name="add",
    description="Add two integers.",
    input_schema={
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
WHOAMI = ToolSpec(name="whoami", description=None, input_schema={})
SYSTEM = "You are a careful test agent."


@pytest.fixture(scope="module")
def server() -> Iterator[LlmTestServer]:
    with LlmTestServer(api_key=KEY, gateway_token=GATEWAY_TOKEN) as s:
        yield s


@pytest.fixture(autouse=True)
def _fresh(server: LlmTestServer) -> None:
    server.reset()


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(timeout=5.0) as c:
        yield c


def endpoint(server: LlmTestServer, flavour: str, *, key: str = KEY, **overrides: Any) -> Endpoint:
    """The endpoint of a catalog entry of type ``flavour`` pointed at the stand-in."""
    if flavour == "cloudflare_ai_gateway":
        config: dict[str, Any] = {"account_id": ACCOUNT, "gateway_id": GATEWAY}
        kind, model = "openai", "gpt-5.2"
    elif flavour == "anthropic":
        config, kind, model = {"base_url": server.url}, "anthropic", "claude-sonnet-4-5"
    else:
        config, kind, model = {"base_url": server.url + "/v1"}, "openai", "gpt-4o-mini"
    args: dict[str, Any] = {"kind": kind, "model_id": model, "config": config, "gateway_token": GATEWAY_TOKEN}
    args.update(overrides)
    return endpoint_for(
        flavour,
        args["kind"],
        args["model_id"],
        args["config"],
        api_key=key,
        gateway_token=args["gateway_token"],
        gateway_base_url=server.url,
    )


def conversation(user: str = "What is 2 + 3?") -> list[Message]:
    return [Message(role="system", content=SYSTEM), Message(role="user", content=user)]


def credential_header(flavour: str) -> tuple[str, str]:
    if flavour == "anthropic":
        return "x-api-key", KEY
    return "authorization", f"Bearer {KEY}"


def leaks(request: RecordedRequest, value: str, *, allowed_header: str | None) -> list[str]:
    """Where ``value`` (in any common encoding) shows up in ``request`` outside ``allowed_header``."""
    places = [("path", request.path), ("body", request.raw)]
    places += [(f"header {name}", v) for name, v in request.headers.items() if name != allowed_header]
    forms = leak_forms(value)
    return [where for where, text in places if any(form in text for form in forms)]


def assert_clean(error: ProviderError, *values: str) -> None:
    """A fixed message (plus at most an HTTP status or a fixed detail) that quotes none of ``values``."""
    text = " ".join([str(error), repr(error), error.message, json.dumps(error.args)])
    for value in values:
        assert value not in text
    assert error.message.startswith(MESSAGES[error.code])
    assert error.__cause__ is None


# --- a plain turn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_plain_text_turn(server: LlmTestServer, client: httpx2.Client, flavour: str) -> None:
    server.script([{"text": "Hello from the model.", "usage": {"input_tokens": 42, "output_tokens": 7}}])

    turn = complete(endpoint(server, flavour), conversation("Say hello."), [], client=client, max_tokens=321)

    assert turn == ModelTurn(
        text="Hello from the model.",
        tool_calls=(),
        usage={"input_tokens": 42, "output_tokens": 7},
        stop_reason="end_turn" if flavour == "anthropic" else "stop",
    )
    [request] = server.requests
    body = request.body
    assert "tools" not in body
    if flavour == "anthropic":
        assert request.path == "/v1/messages"
        assert body["model"] == "claude-sonnet-4-5"
        assert body["max_tokens"] == 321
        assert body["system"] == SYSTEM
        assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
        assert request.headers["anthropic-version"] == ANTHROPIC_VERSION
    else:
        assert body["messages"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Say hello."},
        ]
        limit = "max_tokens" if flavour == "openai_compatible" else "max_completion_tokens"
        assert body[limit] == 321
        assert ("max_tokens" in body) != ("max_completion_tokens" in body)


def test_usage_defaults_to_zero_when_not_reported(server: LlmTestServer, client: httpx2.Client) -> None:
    server.script([{"raw": json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}]})}])
    turn = complete(endpoint(server, "openai_compatible"), conversation(), [], client=client)
    assert turn.text == "hi"
    assert turn.usage == {"input_tokens": 0, "output_tokens": 0}
    assert turn.stop_reason is None


# --- tool calls, and feeding the results back ------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tool_call_then_final_turn(server: LlmTestServer, client: httpx2.Client, flavour: str) -> None:
    server.script(
        [
            {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}], "usage": {"input_tokens": 90}},
            {"text": "2 + 3 = 5", "usage": {"input_tokens": 120, "output_tokens": 6}},
        ]
    )
    ep = endpoint(server, flavour)
    messages = conversation()

    first = complete(ep, messages, [ADD, WHOAMI], client=client)

    assert first.text is None
    [call] = first.tool_calls
    assert call.name == "add" and call.arguments == {"a": 2, "b": 3} and call.id
    assert first.usage["input_tokens"] == 90
    assert first.stop_reason == ("tool_use" if flavour == "anthropic" else "tool_calls")

    messages += [
        Message(role="assistant", content=first.text, tool_calls=first.tool_calls),
        Message(role="tool", content="5", tool_call_id=call.id, name="add"),
    ]
    final = complete(ep, messages, [ADD, WHOAMI], client=client)

    assert final.text == "2 + 3 = 5" and final.tool_calls == ()
    assert final.usage == {"input_tokens": 120, "output_tokens": 6}
    assert server.remaining == 0
    first_request, second_request = server.requests
    body = second_request.body
    if flavour == "anthropic":
        assert body["system"] == SYSTEM
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "What is 2 + 3?"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call.id, "name": "add", "input": {"a": 2, "b": 3}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "5"}]},
        ]
        expected_tools: list[dict[str, Any]] = [
            {"name": "add", "description": "Add two integers.", "input_schema": ADD.input_schema},
            {"name": "whoami", "input_schema": {"type": "object", "properties": {}}},
        ]
    else:
        system, user, assistant, tool = body["messages"]
        assert system == {"role": "system", "content": SYSTEM}
        assert user == {"role": "user", "content": "What is 2 + 3?"}
        assert assistant["role"] == "assistant" and assistant["content"] is None
        [wire_call] = assistant["tool_calls"]
        assert wire_call["id"] == call.id and wire_call["type"] == "function"
        assert wire_call["function"]["name"] == "add"
        assert json.loads(wire_call["function"]["arguments"]) == {"a": 2, "b": 3}
        assert tool == {"role": "tool", "tool_call_id": call.id, "content": "5"}
        expected_tools = [
            {
                "type": "function",
                "function": {"name": "add", "description": "Add two integers.", "parameters": ADD.input_schema},
            },
            {"type": "function", "function": {"name": "whoami", "parameters": {"type": "object", "properties": {}}}},
        ]
    assert first_request.body["tools"] == expected_tools
    assert body["tools"] == expected_tools


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_parallel_tool_calls_answered_together(server: LlmTestServer, client: httpx2.Client, flavour: str) -> None:
    server.script(
        [
            {
                "text": "Let me check both.",
                "tool_calls": [
                    {"name": "add", "arguments": {"a": 1, "b": 1}, "id": "call_A"},
                    {"name": "whoami", "arguments": {}, "id": "call_B"},
                ],
            },
            {"text": "done"},
        ]
    )
    ep = endpoint(server, flavour)
    first = complete(ep, conversation(), [ADD, WHOAMI], client=client)
    assert first.text == "Let me check both."
    assert [(c.id, c.name, c.arguments) for c in first.tool_calls] == [
        ("call_A", "add", {"a": 1, "b": 1}),
        ("call_B", "whoami", {}),
    ]
    messages = [
        *conversation(),
        Message(role="assistant", content=first.text, tool_calls=first.tool_calls),
        Message(role="tool", content="2", tool_call_id="call_A"),
        Message(role="tool", content="", tool_call_id="call_B"),
        Message(role="user", content="And now?"),
    ]
    assert complete(ep, messages, [ADD, WHOAMI], client=client).text == "done"

    wire = server.requests[1].body["messages"]
    if flavour == "anthropic":
        # Both results (and the next user text) in the one user message after the assistant turn.
        assert wire[1]["content"][0] == {"type": "text", "text": "Let me check both."}
        assert wire[2] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_A", "content": "2"},
                {"type": "tool_result", "tool_use_id": "call_B"},
                {"type": "text", "text": "And now?"},
            ],
        }
    else:
        assert wire[2]["content"] == "Let me check both."
        assert wire[3:] == [
            {"role": "tool", "tool_call_id": "call_A", "content": "2"},
            {"role": "tool", "tool_call_id": "call_B", "content": ""},
            {"role": "user", "content": "And now?"},
        ]


def test_tool_call_with_invalid_json_arguments_is_a_provider_error(
    server: LlmTestServer, client: httpx2.Client
) -> None:
    server.script([{"tool_calls": [{"name": "add", "arguments": '{"a": 2, "b": '}]}])
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, "openai"), conversation(), [ADD], client=client)
    assert info.value.code == "provider_error"
    assert "not valid JSON" in info.value.message
    assert_clean(info.value, '"a": 2', KEY)


def test_tool_call_with_non_object_arguments_is_a_provider_error(server: LlmTestServer, client: httpx2.Client) -> None:
    server.script([{"tool_calls": [{"name": "add", "arguments": "[1, 2]"}]}])
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, "openai"), conversation(), [ADD], client=client)
    assert info.value.code == "provider_error"


def test_empty_arguments_string_means_no_arguments(server: LlmTestServer, client: httpx2.Client) -> None:
    server.script([{"tool_calls": [{"name": "whoami", "arguments": ""}]}])
    turn = complete(endpoint(server, "openai"), conversation(), [WHOAMI], client=client)
    assert turn.tool_calls[0].arguments == {}


# --- where the credentials go ------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_credentials_only_in_their_own_headers(
    server: LlmTestServer, client: httpx2.Client, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script([{"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]}, {"echo": True}])
    ep = endpoint(server, flavour)
    first = complete(ep, conversation(), [ADD], client=client)
    messages = [
        *conversation(),
        Message(role="assistant", tool_calls=first.tool_calls),
        Message(role="tool", content="TOOL-RESULT-5", tool_call_id=first.tool_calls[0].id),
    ]
    echoed = complete(ep, messages, [ADD], client=client)

    # The model saw the whole conversation (system prompt, user text, tool result) and no credential.
    assert echoed.text is not None and echoed.text.startswith(ECHO_PREFIX)
    for seen in (SYSTEM, "What is 2 + 3?", "TOOL-RESULT-5"):
        assert seen in echoed.text
    assert KEY not in echoed.text and GATEWAY_TOKEN not in echoed.text

    key_header, key_value = credential_header(flavour)
    assert len(server.requests) == 2
    for request in server.requests:
        assert request.headers[key_header] == key_value
        assert leaks(request, KEY, allowed_header=key_header) == []
        if flavour == "cloudflare_ai_gateway":
            assert request.headers["cf-aig-authorization"] == f"Bearer {GATEWAY_TOKEN}"
            assert leaks(request, GATEWAY_TOKEN, allowed_header="cf-aig-authorization") == []
        else:
            assert "cf-aig-authorization" not in request.headers
            assert leaks(request, GATEWAY_TOKEN, allowed_header=None) == []
    for record in caplog.records:
        text = record.getMessage()
        assert KEY not in text and GATEWAY_TOKEN not in text


def test_the_stand_in_rejects_a_wrong_key(server: LlmTestServer, client: httpx2.Client) -> None:
    # The sanity check behind the test above: the stand-in really checks the credential headers.
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, "anthropic", key="sk-wrong-key-123"), conversation(), [], client=client)
    assert info.value.code == "provider_auth_failed"
    wrong_gateway = endpoint_for(
        "cloudflare_ai_gateway",
        "openai",
        "gpt-5.2",
        {"account_id": ACCOUNT, "gateway_id": GATEWAY},
        api_key=KEY,
        gateway_token="not-the-gateway-token",
        gateway_base_url=server.url,
    )
    with pytest.raises(ProviderError) as info:
        complete(wrong_gateway, conversation(), [], client=client)
    assert info.value.code == "provider_auth_failed"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_endpoint_repr_hides_header_values(server: LlmTestServer, flavour: str) -> None:
    ep = endpoint(server, flavour)
    for text in (repr(ep), str(ep), f"{ep}", f"{ep!r}"):
        assert KEY not in text and GATEWAY_TOKEN not in text
        for name in ep.headers:
            assert repr(name) in text
    assert ep.url in repr(ep) and ep.model in repr(ep)


# --- the gateway ---------------------------------------------------------------------------------


def test_gateway_path_model_and_headers(server: LlmTestServer, client: httpx2.Client) -> None:
    ep = endpoint(server, "cloudflare_ai_gateway")
    assert ep.url == f"{server.url}/{ACCOUNT}/{GATEWAY}/compat/chat/completions"
    assert ep.model == "openai/gpt-5.2"

    assert complete(ep, conversation(), [], client=client).text == "done"

    [request] = server.requests
    assert request.route == "gateway"
    assert request.path == f"/{ACCOUNT}/{GATEWAY}/compat/chat/completions"
    assert (request.account_id, request.gateway_id) == (ACCOUNT, GATEWAY)
    assert request.body["model"] == "openai/gpt-5.2"
    assert request.body["max_completion_tokens"] == 1024


@pytest.mark.parametrize(
    ("kind", "model_id", "wire_model"),
    [
        ("openai", "gpt-5.2", "openai/gpt-5.2"),
        ("anthropic", "claude-sonnet-4-5", "anthropic/claude-sonnet-4-5"),
        ("workers-ai", "@cf/meta/llama-3.1-8b-instruct", "@cf/meta/llama-3.1-8b-instruct"),
        ("openai", "openai/gpt-5.2", "openai/gpt-5.2"),
    ],
)
def test_gateway_model_is_prefixed_once(
    server: LlmTestServer, client: httpx2.Client, kind: str, model_id: str, wire_model: str
) -> None:
    ep = endpoint(server, "cloudflare_ai_gateway", kind=kind, model_id=model_id)
    assert ep.model == wire_model
    complete(ep, conversation(), [], client=client)
    assert server.requests[0].body["model"] == wire_model
    assert ("max_completion_tokens" in server.requests[0].body) == (kind == "openai")


@pytest.mark.parametrize("token", [None, "", "   "])
def test_gateway_without_token(server: LlmTestServer, token: str | None) -> None:
    with pytest.raises(ProviderError) as info:
        endpoint(server, "cloudflare_ai_gateway", gateway_token=token)
    assert info.value.code == "gateway_token_missing"
    assert_clean(info.value, KEY)
    assert server.requests == []


# --- endpoint_for without the network -------------------------------------------------------------


def test_vendor_defaults() -> None:
    openai = endpoint_for("openai", "openai", "gpt-4o", {}, api_key=KEY, gateway_token=None, gateway_base_url="x")
    assert openai.style == "openai"
    assert openai.url == "https://api.openai.com/v1/chat/completions"
    assert openai.headers == {"Authorization": f"Bearer {KEY}"}
    anthropic = endpoint_for(
        "anthropic", "anthropic", "claude-x", {"base_url": None}, api_key=KEY, gateway_token=None, gateway_base_url="x"
    )
    assert anthropic.style == "anthropic"
    assert anthropic.url == "https://api.anthropic.com/v1/messages"
    assert anthropic.headers == {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    pasted = endpoint_for("openai", "openai", "m", {}, api_key=f" {KEY}\n", gateway_token=None, gateway_base_url="x")
    assert pasted.headers == {"Authorization": f"Bearer {KEY}"}
    proxied = endpoint_for(
        "openai",
        "openai",
        "m",
        {"base_url": "https://proxy.example/v1/"},
        api_key=KEY,
        gateway_token=None,
        gateway_base_url="x",
    )
    assert proxied.url == "https://proxy.example/v1/chat/completions"
    gateway = endpoint_for(
        "cloudflare_ai_gateway",
        "openai",
        "gpt-5.2",
        {"account_id": ACCOUNT, "gateway_id": GATEWAY},
        api_key=KEY,
        gateway_token=GATEWAY_TOKEN,
        gateway_base_url="https://gateway.ai.cloudflare.com/v1",
    )
    assert gateway.url == f"https://gateway.ai.cloudflare.com/v1/{ACCOUNT}/{GATEWAY}/compat/chat/completions"
    assert gateway.headers == {"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}", "Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("provider_type", "config", "key"),
    [
        ("openai_compatible", {}, KEY),
        ("openai_compatible", {"base_url": "ftp://models.example/v1"}, KEY),
        ("openai_compatible", {"base_url": f"https://models.example/v1?key={KEY}"}, KEY),
        ("openai_compatible", {"base_url": f"https://user:{KEY}@models.example/v1"}, KEY),
        ("anthropic", {"base_url": "not a url"}, KEY),
        ("cloudflare_ai_gateway", {"gateway_id": GATEWAY}, KEY),
        ("cloudflare_ai_gateway", {"account_id": ACCOUNT}, KEY),
        ("cloudflare_ai_gateway", {"account_id": "../admin", "gateway_id": GATEWAY}, KEY),
        ("cloudflare_ai_gateway", {"account_id": ACCOUNT, "gateway_id": "gw?x=1"}, KEY),
        ("openai", {}, ""),
        ("openai", {}, f"{KEY}\r\nX-Injected: 1"),
        ("anthropic", {}, f"{KEY} with spaces"),
        ("mystery", {}, KEY),
    ],
    # Stable ids (the key is random per process): xdist workers must collect the same names.
    ids=lambda value: value.replace(KEY, "KEY") if isinstance(value, str) else None,
)
def test_invalid_provider_entries(provider_type: str, config: dict[str, Any], key: str) -> None:
    with pytest.raises(ProviderError) as info:
        endpoint_for(
            provider_type,
            "openai",
            "some-model",
            config,
            api_key=key,
            gateway_token=GATEWAY_TOKEN,
            gateway_base_url="https://gateway.ai.cloudflare.com/v1",
        )
    assert info.value.code == "provider_config_invalid"
    assert_clean(info.value, KEY, GATEWAY_TOKEN, "models.example")


# --- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials(server: LlmTestServer, client: httpx2.Client, flavour: str, status: int) -> None:
    server.script([{"status": status, "body": f"{BODY_MARKER} bad key {KEY}"}])
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, flavour), conversation(), [], client=client)
    assert info.value.code == "provider_auth_failed"
    assert f"(HTTP {status})" in info.value.message
    assert_clean(info.value, BODY_MARKER, KEY, GATEWAY_TOKEN, server.url)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
def test_error_status(server: LlmTestServer, client: httpx2.Client, flavour: str, status: int) -> None:
    server.script([{"status": status, "body": BODY_MARKER}])
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, flavour), conversation(), [], client=client)
    assert info.value.code == "provider_error"
    assert info.value.message == f"{MESSAGES['provider_error']} (HTTP {status})"
    assert_clean(info.value, BODY_MARKER, KEY)


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        "",
        "[]",
        '{"choices": []}',
        '{"content": "text, not blocks"}',
        '{"choices": [{"message": {"content": 5}}], "content": [{"type": "tool_use", "id": "x"}]}',
        b"\xff\xfe\x00".decode("latin-1"),
    ],
)
def test_malformed_response(server: LlmTestServer, client: httpx2.Client, flavour: str, raw: str) -> None:
    server.script([{"raw": raw}])
    with pytest.raises(ProviderError) as info:
        complete(endpoint(server, flavour), conversation(), [], client=client)
    assert info.value.code == "provider_error"
    assert_clean(info.value, KEY, "not json", "text, not blocks")


def test_unreachable(server: LlmTestServer, client: httpx2.Client) -> None:
    closed = endpoint_for(
        "openai_compatible",
        "openai",
        "m",
        {"base_url": f"http://127.0.0.1:{free_port()}/v1"},
        api_key=KEY,
        gateway_token=None,
        gateway_base_url="x",
    )
    with pytest.raises(ProviderError) as info:
        complete(closed, conversation(), [], client=client)
    assert info.value.code == "provider_unreachable"
    assert_clean(info.value, KEY, "127.0.0.1")


@pytest.mark.parametrize("flavour", ["openai", "anthropic"])
def test_timeout(server: LlmTestServer, flavour: str) -> None:
    server.script([{"delay_seconds": 3, "text": "too late"}])
    started = time.monotonic()
    with httpx2.Client(timeout=0.3) as slow_client, pytest.raises(ProviderError) as info:
        complete(endpoint(server, flavour), conversation(), [], client=slow_client)
    assert info.value.code == "provider_timeout"
    assert time.monotonic() - started < 2
    assert_clean(info.value, KEY)


def test_provider_error_survives_serialization() -> None:
    error = ProviderError.for_code("provider_error", status=500)
    for copy in (ProviderError(*json.loads(json.dumps(error.args))), pickle.loads(pickle.dumps(error))):  # noqa: S301
        assert (copy.code, copy.message, str(copy)) == (error.code, error.message, str(error))
    assert str(error) == "provider_error: the model provider returned an error (HTTP 500)"


def test_malformed_conversation_is_a_value_error(server: LlmTestServer, client: httpx2.Client) -> None:
    ep = endpoint(server, "openai")
    bad = [
        [],
        [Message(role="tool", content="5")],
        [Message(role="user", content="x", tool_calls=(ToolCall("1", "add", {}),))],
    ]
    for messages in bad:
        with pytest.raises(ValueError, match="message"):
            complete(ep, messages, [], client=client)
    with pytest.raises(ValueError, match="max_tokens"):
        complete(ep, conversation(), [], client=client, max_tokens=0)
    assert server.requests == []


# --- through the egress guard ------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_through_the_egress_guard(server: LlmTestServer, flavour: str) -> None:
    server.script([{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, {"text": "3"}])
    ep = endpoint(server, flavour)
    with guarded_client(LOCAL, [f"127.0.0.1:{server.port}"], timeout=5.0) as guarded:
        first = complete(ep, conversation(), [ADD], client=guarded)
        messages = [
            *conversation(),
            Message(role="assistant", tool_calls=first.tool_calls),
            Message(role="tool", content="3", tool_call_id=first.tool_calls[0].id),
        ]
        assert complete(ep, messages, [ADD], client=guarded).text == "3"
    assert len(server.requests) == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_egress_guard_refusal_propagates(server: LlmTestServer, flavour: str) -> None:
    strict = EgressPolicy(allow_private=False, allow_http_hosts=frozenset({"127.0.0.1"}))
    with guarded_client(strict, timeout=5.0) as guarded, pytest.raises(EgressDeniedError) as info:
        complete(endpoint(server, flavour), conversation(), [ADD], client=guarded)
    assert info.value.code == "egress_denied"
    assert server.requests == []


# --- oversized responses ----------------------------------------------------------------------------

CAP = 256 * 1024


def _capped(server: LlmTestServer) -> httpx2.Client:
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}), max_response_bytes=CAP)
    return guarded_client(policy, [f"127.0.0.1:{server.port}"], timeout=10.0)


def test_an_endless_model_reply_stops_at_the_size_cap(server: LlmTestServer) -> None:
    server.script([{"stream_bytes": 0}])  # never ends by itself
    tracemalloc.start()
    try:
        with _capped(server) as guarded, pytest.raises(ProviderError) as info:
            complete(endpoint(server, "openai"), conversation(), [ADD], client=guarded)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "response_too_large"
    assert_clean(info.value, KEY)
    # The read stopped at the cap: the worker held about one cap's worth, never the stream.
    assert peak < 8 * CAP, peak
    # ... and the server could write little more than what fits in the socket buffers before it noticed.
    deadline = time.monotonic() + 10
    while not server.streamed and time.monotonic() < deadline:
        time.sleep(0.05)
    [sent] = server.streamed
    assert sent < 64 * 1024 * 1024, sent


def test_a_reply_under_the_size_cap_is_read_whole(server: LlmTestServer) -> None:
    server.script([{"stream_bytes": CAP // 2}])
    with _capped(server) as guarded:
        turn = complete(endpoint(server, "openai"), conversation(), [ADD], client=guarded)
    assert turn.text == "x" * (CAP // 2)


def test_a_declared_oversized_reply_is_refused_before_reading(server: LlmTestServer) -> None:
    server.script([{"text": "y" * (CAP + 1)}])  # sent with a Content-Length over the cap
    with _capped(server) as guarded, pytest.raises(ProviderError) as info:
        complete(endpoint(server, "openai"), conversation(), [ADD], client=guarded)
    assert info.value.code == "response_too_large"


class _GuardLike(Exception):
    """Any exception carrying a guard code, as a custom guarded transport might raise."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@pytest.mark.parametrize("code", ["egress_denied", "secret_destination_denied", "egress_unresolvable"])
def test_guard_codes_propagate_unchanged(code: str) -> None:
    raised = _GuardLike(code)

    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise raised

    ep = endpoint_for(
        "openai", "openai", "m", {}, api_key=KEY, gateway_token=None, gateway_base_url="x"
    )  # never contacted: the mock transport refuses
    with httpx2.Client(transport=httpx2.MockTransport(refuse)) as mock, pytest.raises(_GuardLike) as info:
        complete(ep, conversation(), [], client=mock)
    assert info.value is raised


def test_failure_logs_hold_no_credentials(
    server: LlmTestServer, client: httpx2.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script([{"status": 401, "body": BODY_MARKER}, {"raw": "{bad"}])
    for _ in range(2):
        with pytest.raises(ProviderError):
            complete(endpoint(server, "cloudflare_ai_gateway"), conversation(), [], client=client)
    messages = [r.getMessage() for r in caplog.records if r.name == "latchkey.agents"]
    assert any("provider_auth_failed" in m for m in messages)
    assert any("provider_error" in m for m in messages)
    for text in [r.getMessage() for r in caplog.records]:
        for value in (KEY, GATEWAY_TOKEN, BODY_MARKER):
            assert value not in text
