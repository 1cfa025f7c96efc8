"""app.mcp.client against a real MCP server (tests/support/mcp_server.py) on 127.0.0.1, over both transports."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from app.egress.guard import DestinationDeniedError, EgressDeniedError, EgressPolicy, guarded_async_client
from app.mcp import McpError, ToolResult, call_tool, list_tools
from app.mcp.client import MESSAGES
from tests.support.mcp_server import WHOAMI, McpTestServer, Transport

TRANSPORTS: tuple[Transport, ...] = ("streamable_http", "sse")
BODY_MARKER = "BODY-MARKER-d41d8cd9"  # text only the non-MCP endpoint's body contains
QUERY_SECRET = "QUERY-SECRET-8f14e45f"


def plain_factory(**kwargs: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(**kwargs)


class RecordingFactory:
    """A plain httpx2 client factory that remembers the arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> httpx2.AsyncClient:
        self.calls.append(kwargs)
        return httpx2.AsyncClient(**kwargs)


class GuardError(Exception):
    """Stands in for the egress guard's own exception type: anything with a guard `code`."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def assert_clean(error: McpError, *secrets_: str) -> None:
    """The error carries a fixed message (plus at most an HTTP status) and none of the given values."""
    text = " ".join([str(error), repr(error), error.message, json.dumps(error.args)])
    for value in secrets_:
        assert value not in text
    assert error.message.startswith(MESSAGES[error.code])
    assert len(error.message) <= len(MESSAGES[error.code]) + len(" (HTTP 000)")


@pytest.fixture(scope="module", params=TRANSPORTS)
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    with McpTestServer(transport=request.param, token="tok-" + secrets.token_hex(12)) as server:
        yield server


@pytest.fixture
def server(mcp_server: McpTestServer) -> McpTestServer:
    mcp_server.seen_tokens.clear()
    return mcp_server


def rpc_answer(variant: str, message: dict[str, Any]) -> tuple[int, bytes]:
    """A fake Streamable HTTP server that handshakes like MCP (2025-11-25) but then breaks the protocol."""
    if "id" not in message:
        return 202, b""
    if variant == "garbage":
        return 200, b'{"jsonrpc": "2.0", "id": '
    method = message.get("method")
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": "2025-11-25",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "fake", "version": "0"},
        }
    elif method == "tools/list":
        result = {"tools": "nope"} if variant == "badlist" else {"tools": [{"name": "x", "description": BODY_MARKER}]}
    else:
        error = {"code": -32601, "message": f"Method not found {BODY_MARKER}"}
        return 200, json.dumps({"jsonrpc": "2.0", "id": message["id"], "error": error}).encode()
    return 200, json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()


@pytest.fixture(scope="module")
def html_server() -> Iterator[str]:
    """Not an MCP server. `/<status>`: an HTML page at that status; `/rpc/<variant>`: a broken JSON-RPC peer."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            path = self.path.split("?")[0].strip("/")
            if path.startswith("rpc/"):
                if self.command != "POST":
                    status, body, kind = 405, b"", "text/plain"
                else:
                    status, body = rpc_answer(path.removeprefix("rpc/"), json.loads(raw))
                    kind = "application/json"
            else:
                status, kind = int(path or 404), "text/html"
                body = f"<html><body>{BODY_MARKER}</body></html>".encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def closed_port_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/mcp"


def tools_of(server: McpTestServer, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "transport": server.transport,
        "token": server.token,
        "http_client_factory": plain_factory,
    }
    options.update(kwargs)
    return {tool.name: tool for tool in list_tools(server.url, **options)}


def call(server: McpTestServer, name: str, arguments: dict[str, Any], **kwargs: Any) -> ToolResult:
    options: dict[str, Any] = {
        "transport": server.transport,
        "token": server.token,
        "http_client_factory": plain_factory,
    }
    options.update(kwargs)
    return call_tool(server.url, name, arguments, **options)


def expect_error(fn: Callable[[], object], code: str) -> McpError:
    with pytest.raises(McpError) as info:
        fn()
    assert info.value.code == code, info.value
    assert type(info.value) is McpError
    return info.value


# --- listing and calling -------------------------------------------------------------------


def test_lists_tools_with_descriptions_and_schemas(server: McpTestServer) -> None:
    tools = tools_of(server)
    assert set(tools) == {"add", "echo", "whoami", "slow"}
    add = tools["add"]
    assert add.description == "Add two integers."
    assert add.input_schema["type"] == "object"
    assert add.input_schema["required"] == ["a", "b"]
    assert {name: prop["type"] for name, prop in add.input_schema["properties"].items()} == {
        "a": "integer",
        "b": "integer",
    }
    assert tools["echo"].input_schema["properties"]["text"]["type"] == "string"
    assert tools["slow"].input_schema["properties"]["seconds"]["type"] == "number"
    assert tools["whoami"].input_schema.get("properties", {}) == {}
    json.dumps([tool.input_schema for tool in tools.values()])  # plain JSON, storable as is


def test_server_receives_exactly_the_token_sent(server: McpTestServer) -> None:
    tools_of(server)
    assert server.seen_tokens
    assert set(server.seen_tokens) == {server.token}


def test_factory_gets_bearer_header_timeout_and_response_hook(server: McpTestServer) -> None:
    factory = RecordingFactory()
    tools_of(server, http_client_factory=factory, timeout=7.5)
    assert factory.calls
    for kwargs in factory.calls:
        assert set(kwargs) == {"headers", "timeout", "event_hooks"}
        assert kwargs["headers"] == {"Authorization": f"Bearer {server.token}"}
        assert kwargs["timeout"] == httpx2.Timeout(7.5)
        assert len(kwargs["event_hooks"]["response"]) == 1


def test_call_tool_add_echo_whoami(server: McpTestServer) -> None:
    result = call(server, "add", {"a": 2, "b": 3})
    assert result == ToolResult(is_error=False, content=[{"type": "text", "text": "5"}], structured={"result": 5})

    echoed = call(server, "echo", {"text": "hello, tools"})
    assert not echoed.is_error
    assert echoed.content == [{"type": "text", "text": "hello, tools"}]

    who = call(server, "whoami", {})
    assert who.content[0]["text"] == WHOAMI
    assert server.token not in json.dumps(who.content)
    assert set(server.seen_tokens) == {server.token}


def test_tool_level_failures_are_results_not_errors(server: McpTestServer) -> None:
    unknown = call(server, "no_such_tool", {})
    assert unknown.is_error
    bad_args = call(server, "add", {"a": "two"})
    assert bad_args.is_error


def test_paginated_tool_list_is_followed() -> None:
    with McpTestServer(page_size=1) as paged:
        tools = tools_of(paged)
        assert set(tools) == {"add", "echo", "whoami", "slow"}
        assert len(paged.seen_tokens) >= 4  # one request per page at least


def test_endless_tool_list_is_a_protocol_error() -> None:
    with McpTestServer(endless_pages=True) as endless:
        error = expect_error(lambda: tools_of(endless), "protocol_error")
        assert_clean(error, endless.token)


# --- credentials -----------------------------------------------------------------------------


def test_wrong_token_is_auth_failed(server: McpTestServer) -> None:
    wrong = "wrong-" + secrets.token_hex(12)
    started = time.monotonic()
    error = expect_error(lambda: tools_of(server, token=wrong), "auth_failed")
    assert time.monotonic() - started < 2
    assert error.message == MESSAGES["auth_failed"] + " (HTTP 401)"
    assert_clean(error, wrong, server.token)
    assert server.seen_tokens == [wrong]


def test_missing_token_is_auth_failed(server: McpTestServer) -> None:
    error = expect_error(lambda: tools_of(server, token=None), "auth_failed")
    assert_clean(error, server.token)
    assert server.seen_tokens == []  # no Authorization header at all


def test_call_tool_with_wrong_token_is_auth_failed(server: McpTestServer) -> None:
    wrong = "wrong-" + secrets.token_hex(12)
    error = expect_error(lambda: call(server, "add", {"a": 1, "b": 1}, token=wrong), "auth_failed")
    assert_clean(error, wrong)


def test_rotated_token_takes_effect_at_runtime(server: McpTestServer) -> None:
    old, new = server.token, "rotated-" + secrets.token_hex(12)
    server.set_token(new)
    try:
        expect_error(lambda: tools_of(server, token=old), "auth_failed")
        assert "add" in tools_of(server, token=new)
        assert server.seen_tokens[0] == old
        assert set(server.seen_tokens[1:]) == {new}
    finally:
        server.set_token(old)


# --- transport failures ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closed_port_is_unreachable_quickly(transport: str) -> None:
    url = closed_port_url()
    started = time.monotonic()
    error = expect_error(
        lambda: list_tools(url, transport=transport, token="t0ken-value", http_client_factory=plain_factory),
        "unreachable",
    )
    assert time.monotonic() - started < 2
    assert_clean(error, "t0ken-value", "127.0.0.1")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_slow_server_times_out_at_the_deadline(transport: Transport) -> None:
    with McpTestServer(transport=transport, delay_seconds=3) as slow:
        started = time.monotonic()
        error = expect_error(lambda: tools_of(slow, timeout=1), "timeout")
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 1.5, elapsed
        assert_clean(error, slow.token)


def test_slow_tool_times_out_at_the_deadline(server: McpTestServer) -> None:
    started = time.monotonic()
    expect_error(lambda: call(server, "slow", {"seconds": 5}, timeout=1), "timeout")
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status", [404, 500, 200])
def test_non_mcp_endpoint_is_protocol_error(html_server: str, transport: str, status: int) -> None:
    url = f"{html_server}/{status}?api_key={QUERY_SECRET}"
    error = expect_error(
        lambda: list_tools(url, transport=transport, token="t0ken-value", http_client_factory=plain_factory),
        "protocol_error",
    )
    assert_clean(error, BODY_MARKER, QUERY_SECRET, "t0ken-value", "html")
    if status != 200:
        assert error.message == f"{MESSAGES['protocol_error']} (HTTP {status})"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status", [401, 403])
def test_any_401_or_403_is_auth_failed(html_server: str, transport: str, status: int) -> None:
    url = f"{html_server}/{status}?api_key={QUERY_SECRET}"
    error = expect_error(
        lambda: list_tools(url, transport=transport, token="t0ken-value", http_client_factory=plain_factory),
        "auth_failed",
    )
    assert error.message == f"{MESSAGES['auth_failed']} (HTTP {status})"
    assert_clean(error, BODY_MARKER, QUERY_SECRET, "t0ken-value")


@pytest.mark.parametrize("variant", ["garbage", "badlist", "badtool"])
def test_broken_json_rpc_peer_is_protocol_error(html_server: str, variant: str) -> None:
    url = f"{html_server}/rpc/{variant}"
    error = expect_error(
        lambda: list_tools(url, token="t0ken-value", http_client_factory=plain_factory, timeout=5), "protocol_error"
    )
    assert_clean(error, BODY_MARKER, "t0ken-value", "nope")
    assert error.message == MESSAGES["protocol_error"]


def test_mcp_error_survives_celery_json_results() -> None:
    from celery import Celery
    from celery.backends.base import Backend

    backend = Backend(app=Celery(set_as_current=False), serializer="json")
    original = McpError.for_code("auth_failed", 403)
    wire = json.loads(json.dumps(backend.prepare_exception(original)))
    restored = backend.exception_to_python(wire)
    assert type(restored) is McpError
    assert (restored.code, restored.message) == ("auth_failed", original.message)


def test_refuses_to_run_inside_an_event_loop() -> None:
    async def inside() -> None:
        list_tools("http://127.0.0.1:9/mcp", token=None, http_client_factory=plain_factory)

    with pytest.raises(RuntimeError, match="synchronous"):
        asyncio.run(inside())


def test_invalid_arguments_are_rejected_before_any_request() -> None:
    with pytest.raises(ValueError, match="transport"):
        list_tools("http://127.0.0.1:9/mcp", transport="websocket", token=None, http_client_factory=plain_factory)
    with pytest.raises(ValueError, match="timeout"):
        list_tools("http://127.0.0.1:9/mcp", token=None, http_client_factory=plain_factory, timeout=0)


# --- threads and the egress guard -----------------------------------------------------------


def test_works_from_worker_threads(server: McpTestServer) -> None:
    """Like Celery's threads pool: each call runs its own loop in a thread with none running."""

    def job(n: int) -> Any:
        if n % 2:
            return call(server, "add", {"a": n, "b": n}).structured
        return sorted(tools_of(server))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(job, range(8)))
    for n, result in enumerate(results):
        assert result == ({"result": 2 * n} if n % 2 else ["add", "echo", "slow", "whoami"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_guard_error_from_factory_propagates_unchanged(transport: str) -> None:
    denied = GuardError("egress_denied")

    def guarded_factory(**kwargs: Any) -> httpx2.AsyncClient:
        raise denied

    with pytest.raises(GuardError) as info:
        list_tools(closed_port_url(), transport=transport, token="t", http_client_factory=guarded_factory)
    assert info.value is denied


def test_guard_error_at_request_time_propagates_unchanged(server: McpTestServer) -> None:
    denied = GuardError("secret_destination_denied")

    class DenyingTransport(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            raise denied

    def guarded_factory(**kwargs: Any) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=DenyingTransport(), **kwargs)

    with pytest.raises(GuardError) as info:
        call(server, "add", {"a": 1, "b": 2}, http_client_factory=guarded_factory)
    assert info.value is denied
    assert server.seen_tokens == []


def test_unresolvable_guard_error_is_unreachable(server: McpTestServer) -> None:
    def guarded_factory(**kwargs: Any) -> httpx2.AsyncClient:
        raise GuardError("egress_unresolvable")

    error = expect_error(lambda: tools_of(server, http_client_factory=guarded_factory), "unreachable")
    assert_clean(error, server.token)


# --- with the real egress guard (app.egress.guard) ---------------------------------------


def test_real_guard_allowing_loopback_works(server: McpTestServer) -> None:
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}))
    factory = functools.partial(guarded_async_client, policy, [f"127.0.0.1:{server.port}"])
    assert "add" in tools_of(server, http_client_factory=factory)
    assert call(server, "add", {"a": 2, "b": 3}, http_client_factory=factory).structured == {"result": 5}
    wrong = "wrong-" + secrets.token_hex(8)
    expect_error(lambda: tools_of(server, token=wrong, http_client_factory=factory), "auth_failed")
    assert set(server.seen_tokens) == {server.token, wrong}


def test_real_guard_denials_propagate_unchanged(server: McpTestServer) -> None:
    strict = functools.partial(guarded_async_client, EgressPolicy())  # no private addresses, no plain http
    with pytest.raises(EgressDeniedError) as denied:
        tools_of(server, http_client_factory=strict)
    assert denied.value.code == "egress_denied"

    permissive = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}))
    elsewhere = functools.partial(guarded_async_client, permissive, ["mcp.example.com"])
    with pytest.raises(DestinationDeniedError) as outside:
        call(server, "add", {"a": 1, "b": 1}, http_client_factory=elsewhere)
    assert outside.value.code == "secret_destination_denied"
    assert server.seen_tokens == []  # refused before any connection


# --- oversized responses ---------------------------------------------------------------------------

CAP = 128 * 1024


def capped_factory(server: McpTestServer) -> Callable[..., httpx2.AsyncClient]:
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}), max_response_bytes=CAP)
    return functools.partial(guarded_async_client, policy, [f"127.0.0.1:{server.port}"])


def test_an_oversized_tool_result_is_response_too_large(server: McpTestServer) -> None:
    # The real server's echo tool answers as much as it is sent: over the cap (an SSE event or a JSON body).
    factory = capped_factory(server)
    error = expect_error(
        lambda: call(server, "echo", {"text": "x" * (4 * CAP)}, http_client_factory=factory), "response_too_large"
    )
    assert_clean(error, server.token)
    # Under the cap the same connection settings work.
    small = call(server, "echo", {"text": "x" * (CAP // 4)}, http_client_factory=factory)
    assert small.content[0]["text"] == "x" * (CAP // 4)
