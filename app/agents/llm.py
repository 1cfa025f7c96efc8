"""One model turn against an LLM provider: OpenAI-style chat completions or the Anthropic Messages API.

``endpoint_for`` turns a provider catalog entry (see API.md, "Provider catalog") plus the resolved
provider key into an ``Endpoint``: the URL, the model name on the wire and the credential headers.
``complete`` sends the conversation so far and the tool list to that endpoint through an
``httpx2.Client`` made by the caller (in production the egress-guarded one from
``app.egress.guarded_client``; its timeout is the caller's) and returns the model's reply as a
``ModelTurn``: text, tool calls with parsed arguments, token usage. The worker's agent loop calls it
once per step, feeding tool results back as ``Message(role="tool", ...)``.

Credentials travel only in request headers. They are never put in a URL, a request body, a log line
or an exception, and ``Endpoint``'s repr shows header names only. Failures raise ``ProviderError``
with a stable ``code`` and a fixed message (at most an HTTP status is added), never the provider's
response body; it survives Celery's JSON result serializer (``ProviderError(*args)`` rebuilds it).
An exception from the caller's egress guard (``code`` in ``GUARD_CODES``) propagates unchanged.

Synchronous and thread-safe as long as the client is (httpx2 clients are).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx2

from app.egress.urls import BASE_URL, UrlError
from app.errors import WorkerError
from app.providers.catalog import PROVIDER_TYPES

log = logging.getLogger("latchkey.agents")

Style = Literal["openai", "anthropic"]
Role = Literal["system", "user", "assistant", "tool"]

ROLES: Final = frozenset({"system", "user", "assistant", "tool"})

OPENAI_BASE_URL: Final = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL: Final = "https://api.anthropic.com"
ANTHROPIC_VERSION: Final = "2023-06-01"

# Errors of the caller's egress guard: re-raised exactly as the client raised them.
GUARD_CODES: Final = frozenset({"egress_denied", "secret_destination_denied", "egress_unresolvable"})

MESSAGES: Final = {
    "provider_auth_failed": "the model provider rejected the credentials",
    "provider_unreachable": "the model provider could not be reached",
    "provider_timeout": "the model provider did not answer in time",
    "provider_error": "the model provider returned an error",
    "gateway_token_missing": "the AI gateway token is not configured",
    "provider_config_invalid": "the provider configuration is invalid",
    "response_too_large": "the model provider's response was too large",
}

# Header values we send: visible ASCII only. Anything else would make httpx2/h11 raise an error whose
# message or attributes quote the value, i.e. the key.
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")
# Cloudflare account ids are 32 hex digits and gateway ids are slugs; both become path segments.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model; ``input_schema`` is a JSON Schema object."""

    name: str
    description: str | None
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model asked for (or made earlier, when fed back in an assistant message)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One conversation message.

    ``tool_calls`` only on assistant messages; ``tool_call_id`` (required) only on tool messages,
    whose ``content`` is the tool's result as text. ``name`` is informational (e.g. the tool's name on
    a tool message) and is not sent to the provider.
    """

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ModelTurn:
    """The model's reply. ``usage`` has ``input_tokens`` and ``output_tokens`` (0 when not reported).

    ``stop_reason`` is the provider's own value (OpenAI ``finish_reason``: stop, tool_calls, length, ...;
    Anthropic ``stop_reason``: end_turn, tool_use, max_tokens, ...), or None if it sent none.
    """

    text: str | None
    tool_calls: tuple[ToolCall, ...]
    usage: dict[str, int]
    stop_reason: str | None = None


@dataclass(frozen=True, repr=False)
class Endpoint:
    """Where and how to call a model. Built by ``endpoint_for``; ``headers`` hold the credentials.

    ``max_tokens_field`` is the request field that carries the output limit: the OpenAI API itself
    wants ``max_completion_tokens`` (newer models reject ``max_tokens``); compatible servers and the
    Anthropic API take ``max_tokens``.
    """

    style: Style
    url: str
    model: str
    headers: dict[str, str] = field(repr=False)
    max_tokens_field: str = "max_tokens"

    def __repr__(self) -> str:
        # Header names only: every value may be (or contain) a credential.
        hidden = ", ".join(f"{name!r}: '***'" for name in self.headers)
        return (
            f"Endpoint(style={self.style!r}, url={self.url!r}, model={self.model!r}, "
            f"headers={{{hidden}}}, max_tokens_field={self.max_tokens_field!r})"
        )

    __str__ = __repr__


class ProviderError(WorkerError):
    """A failed model call or an unusable provider entry.

    ``code``: provider_auth_failed (401/403), provider_unreachable, provider_timeout, provider_error
    (any other HTTP error status, or a response that is not the expected JSON), response_too_large
    (over the egress guard's ``max_response_bytes``; the read stopped there), gateway_token_missing,
    provider_config_invalid (raised by ``endpoint_for`` only). ``message`` is safe to show and to log.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code, message if message is not None else MESSAGES.get(code, "the model call failed"))

    @classmethod
    def for_code(cls, code: str, *, status: int | None = None, detail: str | None = None) -> ProviderError:
        """The fixed message for ``code``, plus an HTTP status or a fixed detail phrase of our own."""
        message = MESSAGES[code]
        if detail is not None:
            message = f"{message}: {detail}"
        if status is not None:
            message = f"{message} (HTTP {status})"
        return cls(code, message)


def _config_error(detail: str) -> ProviderError:
    return ProviderError.for_code("provider_config_invalid", detail=detail)


# --- endpoint_for --------------------------------------------------------------------------------


def _base_url(value: Any, what: str) -> str:
    """A validated base URL without its trailing slash (the message never quotes the value)."""
    if not isinstance(value, str) or not value.strip():
        raise _config_error(f"{what} is required")
    try:
        return BASE_URL.check(value)
    except UrlError as exc:
        raise _config_error(f"{what} {exc}") from None


def _header_value(value: Any, what: str) -> str:
    # Surrounding whitespace is dropped: a key pasted or read from a file often ends in a newline.
    value = value.strip() if isinstance(value, str) else value
    if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
        raise _config_error(f"the {what} is empty or not a valid header value")
    return value


def _path_segment(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise _config_error(f"config.{key} is required")
    if not _PATH_SEGMENT.fullmatch(value):
        raise _config_error(f"config.{key} may hold only letters, digits, '-' and '_'")
    return value


def endpoint_for(
    provider_type: str,
    kind: str,
    model_id: str,
    config: Mapping[str, Any],
    *,
    api_key: str,
    gateway_token: str | None,
    gateway_base_url: str,
) -> Endpoint:
    """The endpoint for a provider catalog entry and its resolved key (no network access).

    ``gateway_token`` and ``gateway_base_url`` are worker configuration (``LATCHKEY_GATEWAY_TOKEN``,
    ``LATCHKEY_AI_GATEWAY_BASE_URL``), used only by ``cloudflare_ai_gateway``. Raises ``ProviderError``
    (gateway_token_missing, provider_config_invalid).
    """
    if provider_type not in PROVIDER_TYPES:
        raise _config_error("unknown provider type")
    if not isinstance(model_id, str) or not model_id.strip():
        raise _config_error("model_id is required")
    model = model_id.strip()
    config = config or {}
    if provider_type == "cloudflare_ai_gateway":
        # Checked first: without the operator's token no request can succeed, whatever the entry says.
        if gateway_token is None or not gateway_token.strip():
            raise ProviderError.for_code("gateway_token_missing")
        token = _header_value(gateway_token, "AI gateway token")
        key = _header_value(api_key, "provider key")
        base = _base_url(gateway_base_url, "the AI gateway base URL")
        account = _path_segment(config, "account_id")
        gateway = _path_segment(config, "gateway_id")
        if not isinstance(kind, str) or not kind.strip():
            raise _config_error("kind is required")
        prefix = kind.strip()
        return Endpoint(
            style="openai",
            url=f"{base}/{account}/{gateway}/compat/chat/completions",
            model=model if "/" in model else f"{prefix}/{model}",
            headers={"cf-aig-authorization": f"Bearer {token}", "Authorization": f"Bearer {key}"},
            # The compat endpoint passes an OpenAI model's request through to OpenAI as is.
            max_tokens_field="max_completion_tokens" if prefix == "openai" else "max_tokens",
        )
    key = _header_value(api_key, "provider key")
    if provider_type == "anthropic":
        base = _base_url(config.get("base_url") or ANTHROPIC_BASE_URL, "config.base_url")
        return Endpoint(
            style="anthropic",
            url=f"{base}/v1/messages",
            model=model,
            headers={"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION},
        )
    if provider_type == "openai":
        base = _base_url(config.get("base_url") or OPENAI_BASE_URL, "config.base_url")
        field_name = "max_completion_tokens"
    else:  # openai_compatible: the base URL is the whole point of the entry
        base = _base_url(config.get("base_url"), "config.base_url")
        field_name = "max_tokens"
    return Endpoint(
        style="openai",
        url=f"{base}/chat/completions",
        model=model,
        headers={"Authorization": f"Bearer {key}"},
        max_tokens_field=field_name,
    )


# --- requests --------------------------------------------------------------------------------------


def _check_messages(messages: Sequence[Message]) -> None:
    """Programming errors in the conversation: ValueError (messages never quote content)."""
    if not messages:
        raise ValueError("at least one message is required")
    for index, m in enumerate(messages):
        if not isinstance(m, Message):
            raise TypeError(f"messages[{index}] is not a Message")
        if m.role not in ROLES:
            raise ValueError(f"messages[{index}] has an unknown role")
        if m.content is not None and not isinstance(m.content, str):
            raise ValueError(f"messages[{index}].content must be a string or None")
        if m.tool_calls and m.role != "assistant":
            raise ValueError(f"messages[{index}]: only assistant messages carry tool calls")
        if m.role == "tool" and not m.tool_call_id:
            raise ValueError(f"messages[{index}]: a tool message needs tool_call_id")
        if m.role != "tool" and m.tool_call_id is not None:
            raise ValueError(f"messages[{index}]: only tool messages carry tool_call_id")


def _schema(spec: ToolSpec) -> dict[str, Any]:
    # Both APIs want an object schema; a tool without parameters may arrive with an empty one.
    return dict(spec.input_schema) if spec.input_schema else {"type": "object", "properties": {}}


def _openai_body(endpoint: Endpoint, messages: Sequence[Message], tools: Sequence[ToolSpec], max_tokens: int) -> Any:
    wire: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            wire.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""})
        elif m.role == "assistant":
            item: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                    }
                    for call in m.tool_calls
                ]
            elif m.content is None:
                item["content"] = ""  # content may be null only next to tool_calls
            wire.append(item)
        else:
            wire.append({"role": m.role, "content": m.content or ""})
    body: dict[str, Any] = {"model": endpoint.model, "messages": wire, endpoint.max_tokens_field: max_tokens}
    if tools:
        functions = []
        for spec in tools:
            function: dict[str, Any] = {"name": spec.name}
            if spec.description:
                function["description"] = spec.description
            function["parameters"] = _schema(spec)
            functions.append({"type": "function", "function": function})
        body["tools"] = functions
    return body


def _anthropic_body(endpoint: Endpoint, messages: Sequence[Message], tools: Sequence[ToolSpec], max_tokens: int) -> Any:
    system = [m.content for m in messages if m.role == "system" and m.content]
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        # Consecutive same-role turns are merged: all tool results answering one assistant turn must
        # sit in the single user message that follows it.
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for m in messages:
        if m.role == "user":
            add("user", [{"type": "text", "text": m.content}] if m.content else [])
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            blocks.extend(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments} for call in m.tool_calls
            )
            add("assistant", blocks)
        elif m.role == "tool":
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id}
            if m.content:
                result["content"] = m.content
            add("user", [result])
    body: dict[str, Any] = {"model": endpoint.model, "max_tokens": max_tokens, "messages": turns}
    if system:
        body["system"] = "\n\n".join(system)
    if tools:
        rendered = []
        for spec in tools:
            tool: dict[str, Any] = {"name": spec.name}
            if spec.description:
                tool["description"] = spec.description
            tool["input_schema"] = _schema(spec)
            rendered.append(tool)
        body["tools"] = rendered
    return body


# --- responses -------------------------------------------------------------------------------------


class _BadShape(Exception):
    """The response JSON is not what the API documents; ``detail`` is a fixed phrase of ours."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage(data: dict[str, Any], input_key: str, output_key: str) -> dict[str, int]:
    usage = data.get("usage")
    return {"input_tokens": _count(usage, input_key), "output_tokens": _count(usage, output_key)}


def _reason(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _arguments(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):  # some compatible servers send an object instead of a JSON string
        return raw
    if not isinstance(raw, str):
        raise _BadShape("tool call arguments are not a JSON string")
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise _BadShape("tool call arguments are not valid JSON") from None
    if not isinstance(parsed, dict):
        raise _BadShape("tool call arguments are not a JSON object")
    return parsed


def _name_and_id(call_id: Any, name: Any) -> tuple[str, str]:
    if not isinstance(call_id, str) or not call_id:
        raise _BadShape("a tool call has no id")
    if not isinstance(name, str) or not name:
        raise _BadShape("a tool call has no name")
    return call_id, name


def _openai_text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content or None
    if isinstance(content, list):  # content parts, as some compatible servers answer
        texts = [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(texts) or None
    raise _BadShape("the message content is not text")


def _parse_openai(data: dict[str, Any]) -> ModelTurn:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _BadShape("the response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise _BadShape("the response has no message")
    text = _openai_text(message.get("content"))
    if text is None and isinstance(message.get("refusal"), str):
        text = message["refusal"] or None
    raw_calls = message.get("tool_calls")
    if raw_calls is not None and not isinstance(raw_calls, list):
        raise _BadShape("tool_calls is not a list")
    calls = []
    for raw in raw_calls or []:
        if not isinstance(raw, dict) or raw.get("type", "function") != "function":
            raise _BadShape("a tool call is not a function call")
        function = raw.get("function")
        if not isinstance(function, dict):
            raise _BadShape("a tool call has no function")
        call_id, name = _name_and_id(raw.get("id"), function.get("name"))
        calls.append(ToolCall(id=call_id, name=name, arguments=_arguments(function.get("arguments"))))
    return ModelTurn(
        text=text,
        tool_calls=tuple(calls),
        usage=_usage(data, "prompt_tokens", "completion_tokens"),
        stop_reason=_reason(choices[0].get("finish_reason")),
    )


def _parse_anthropic(data: dict[str, Any]) -> ModelTurn:
    content = data.get("content")
    if not isinstance(content, list):
        raise _BadShape("the response has no content")
    texts: list[str] = []
    calls = []
    for block in content:
        if not isinstance(block, dict):
            raise _BadShape("a content block is not an object")
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _BadShape("a text block has no text")
            texts.append(block["text"])
        elif kind == "tool_use":
            call_id, name = _name_and_id(block.get("id"), block.get("name"))
            raw_input = block.get("input")
            if raw_input is not None and not isinstance(raw_input, dict):
                raise _BadShape("tool call arguments are not a JSON object")
            calls.append(ToolCall(id=call_id, name=name, arguments=raw_input or {}))
        # Other blocks (thinking, server tools) are not ours to act on.
    return ModelTurn(
        text="".join(texts) or None,
        tool_calls=tuple(calls),
        usage=_usage(data, "input_tokens", "output_tokens"),
        stop_reason=_reason(data.get("stop_reason")),
    )


# --- the call --------------------------------------------------------------------------------------


def _host(url: str) -> str:
    try:
        return httpx2.URL(url).host
    except (httpx2.InvalidURL, TypeError, ValueError):
        return "?"


def _transport_error(exc: Exception) -> ProviderError | None:
    """The ProviderError for an exception out of ``client.post``, or None if it is not a transport failure."""
    if getattr(exc, "code", None) == "response_too_large":  # the guard's cap stopped the read
        return ProviderError.for_code("response_too_large")
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError.for_code("provider_timeout")
    if isinstance(exc, (httpx2.NetworkError, httpx2.ProxyError, httpx2.UnsupportedProtocol, httpx2.InvalidURL)):
        return ProviderError.for_code("provider_unreachable")
    if isinstance(exc, OSError):  # a connect failure that escaped httpx2's mapping
        return ProviderError.for_code("provider_unreachable")
    if isinstance(exc, httpx2.HTTPError):  # e.g. the server broke the HTTP protocol or closed early
        return ProviderError.for_code("provider_error", detail="no valid HTTP response")
    return None


def _post(endpoint: Endpoint, body: Any, client: httpx2.Client) -> httpx2.Response:
    host = _host(endpoint.url)
    try:
        return client.post(endpoint.url, json=body, headers=endpoint.headers)
    except Exception as exc:
        if getattr(exc, "code", None) in GUARD_CODES and not isinstance(exc, ProviderError):
            raise  # the egress guard's refusal: the caller maps it (and audits it)
        error = _transport_error(exc)
        if error is None:
            raise
        log.info("model call to %s failed: %s (%s)", host, error.code, type(exc).__name__)
        raise error from None


def complete(
    endpoint: Endpoint,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec],
    *,
    client: httpx2.Client,
    max_tokens: int = 1024,
) -> ModelTurn:
    """Send one model turn: ``messages`` (the whole conversation so far) with ``tools`` offered.

    Raises ``ProviderError`` (provider_auth_failed, provider_unreachable, provider_timeout,
    provider_error); the egress guard's errors propagate unchanged; ValueError for a malformed
    conversation (a tool message without ``tool_call_id``, tool calls on a non-assistant message...).
    """
    if endpoint.style not in ("openai", "anthropic"):
        raise ValueError("unknown endpoint style")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("max_tokens must be a positive integer")
    _check_messages(messages)
    if endpoint.style == "openai":
        body = _openai_body(endpoint, messages, tools, max_tokens)
    else:
        body = _anthropic_body(endpoint, messages, tools, max_tokens)

    response = _post(endpoint, body, client)
    try:
        turn = _read(endpoint, response)
    except ProviderError as error:
        log.info("model call to %s failed: %s", _host(endpoint.url), error)
        raise
    log.debug(
        "model call to %s: %d tool call(s), %d+%d tokens",
        _host(endpoint.url),
        len(turn.tool_calls),
        turn.usage["input_tokens"],
        turn.usage["output_tokens"],
    )
    return turn


def _read(endpoint: Endpoint, response: httpx2.Response) -> ModelTurn:
    """The turn in a provider's response; ProviderError for an error status or an unexpected body."""
    status = response.status_code
    if status in (401, 403):
        raise ProviderError.for_code("provider_auth_failed", status=status)
    if not 200 <= status < 300:
        # 3xx included: redirects are never followed (the guard refuses them), so one is an error here.
        raise ProviderError.for_code("provider_error", status=status)
    try:
        data = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        data = None
    if not isinstance(data, dict):
        raise ProviderError.for_code("provider_error", detail="the response is not a JSON object")
    try:
        return _parse_openai(data) if endpoint.style == "openai" else _parse_anthropic(data)
    except _BadShape as exc:
        raise ProviderError.for_code("provider_error", detail=exc.detail) from None


__all__ = [
    "ANTHROPIC_VERSION",
    "GUARD_CODES",
    "MESSAGES",
    "Endpoint",
    "Message",
    "ModelTurn",
    "ProviderError",
    "Role",
    "Style",
    "ToolCall",
    "ToolSpec",
    "complete",
    "endpoint_for",
]
