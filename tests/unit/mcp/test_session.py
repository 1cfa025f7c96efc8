"""app.mcp.client.McpSession against a real MCP server: one handshake for many requests, re-opened once when dead."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from app.mcp import McpError
from app.mcp.client import MESSAGES, McpSession
from tests.support.mcp_server import WHOAMI, McpTestServer, Transport

# (transport, legacy): Streamable HTTP stateless (2026 discover), Streamable HTTP with a session id
# (the classic initialize handshake, closed with a DELETE), and SSE.
KINDS: tuple[tuple[Transport, bool], ...] = (("streamable_http", False), ("streamable_http", True), ("sse", False))
KIND_IDS = ["streamable_http", "streamable_http-legacy", "sse"]


def plain_factory(**kwargs: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(**kwargs)


def session_to(server: McpTestServer, **kwargs: Any) -> McpSession:
    options: dict[str, Any] = {
        "transport": server.transport,
        "token": server.token,
        "http_client_factory": plain_factory,
        "timeout": 5,
    }
    options.update(kwargs)
    return McpSession(server.url, **options)


def wait_for(condition: Any, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    transport, legacy = request.param
    with McpTestServer(transport=transport, legacy=legacy, token="tok-" + secrets.token_hex(12)) as running:
        yield running


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "latchkey-mcp-session"]


def test_many_calls_share_one_handshake(server: McpTestServer) -> None:
    with session_to(server) as session:
        assert server.handshakes() == 0  # nothing is sent before the first request
        results = [session.call_tool("add", {"a": n, "b": 1}).structured for n in range(3)]
        assert {tool.name for tool in session.list_tools()} == {"add", "echo", "whoami", "slow"}
        assert session.call_tool("whoami", {}).content[0]["text"] == WHOAMI
    assert results == [{"result": 1}, {"result": 2}, {"result": 3}]
    assert server.handshakes() == 1
    assert session.opened == 1
    assert server.methods().count("tools/call") == 4
    if server.legacy:
        assert server.methods().count("initialize") == 1


def test_close_ends_the_connection_the_session_and_the_thread(server: McpTestServer) -> None:
    before = len(session_threads())
    session = session_to(server)
    session.call_tool("add", {"a": 1, "b": 2})
    assert len(session_threads()) == before + 1
    if server.transport == "sse":
        assert server.open_streams() == 1
    assert server.open_connections() >= 1

    session.close()

    assert len(session_threads()) == before
    # The server notices a closed connection and stream on its own loop: under load, a moment later.
    assert wait_for(lambda: server.open_connections() == 0), server.open_connections()
    assert wait_for(lambda: server.open_streams() == 0), server.open_streams()
    if server.legacy:  # the SDK ended its session id with a DELETE
        assert server.requests[-1] == ("DELETE", None)
    session.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        session.call_tool("add", {"a": 1, "b": 2})


def test_a_session_never_used_opens_nothing() -> None:
    with McpTestServer() as server:
        McpSession(server.url, token=server.token, http_client_factory=plain_factory).close()
        assert server.requests == []


@pytest.mark.parametrize(("transport", "legacy"), KINDS, ids=KIND_IDS)
def test_a_restarted_server_gets_the_session_reopened_once(transport: Transport, legacy: bool) -> None:
    first = McpTestServer(transport=transport, legacy=legacy).start()
    port, token = first.port, first.token
    try:
        session = McpSession(first.url, transport=transport, token=token, http_client_factory=plain_factory, timeout=5)
        assert session.call_tool("add", {"a": 1, "b": 1}).structured == {"result": 2}
    finally:
        first.stop()
    with McpTestServer(transport=transport, legacy=legacy, port=port, token=token) as second, session:
        assert session.call_tool("add", {"a": 2, "b": 2}).structured == {"result": 4}
        assert session.call_tool("add", {"a": 3, "b": 3}).structured == {"result": 6}
        if transport == "streamable_http" and not legacy:
            # Stateless: nothing to forget, the next request simply goes to the new process.
            assert (session.opened, second.handshakes()) == (1, 0)
        else:
            # The old session is unknown there (404, or the SSE stream ended): one new handshake.
            assert (session.opened, second.handshakes()) == (2, 1)
        assert second.methods().count("tools/call") == 2 + (0 if transport == "sse" or not legacy else 1)


def test_a_server_gone_for_good_is_reopened_once_then_unreachable() -> None:
    server = McpTestServer().start()
    session = McpSession(server.url, token=server.token, http_client_factory=plain_factory, timeout=5)
    try:
        session.call_tool("add", {"a": 1, "b": 1})
    finally:
        server.stop()
    with session:
        started = time.monotonic()
        with pytest.raises(McpError) as info:
            session.call_tool("add", {"a": 1, "b": 1})
        assert info.value.code == "unreachable"
        assert time.monotonic() - started < 3
        assert session.opened == 2  # the one re-open, then the error surfaced


def test_errors_are_mapped_as_for_one_shot_calls(server: McpTestServer) -> None:
    wrong = "wrong-" + secrets.token_hex(12)
    with session_to(server, token=wrong) as session, pytest.raises(McpError) as info:
        session.call_tool("add", {"a": 1, "b": 1})
    assert info.value.code == "auth_failed"
    assert info.value.message == MESSAGES["auth_failed"] + " (HTTP 401)"
    assert wrong not in str(info.value) + repr(info.value.args)
    assert session.opened == 1  # a connection opened for the request is never re-opened

    with session_to(server) as session:
        assert session.call_tool("no_such_tool", {}).is_error
        started = time.monotonic()
        with pytest.raises(McpError) as slow:
            session.call_tool("slow", {"seconds": 5})
        assert slow.value.code == "timeout"
        assert time.monotonic() - started < 6
        assert session.opened == 1  # a timeout does not re-open: the server may still be working on it


def test_credentials_refused_mid_session_are_auth_failed_and_not_reopened(server: McpTestServer) -> None:
    old = server.token
    with session_to(server) as session:
        assert session.call_tool("add", {"a": 1, "b": 1}).structured == {"result": 2}
        server.set_token("rotated-" + secrets.token_hex(12))
        try:
            with pytest.raises(McpError) as info:
                session.call_tool("add", {"a": 1, "b": 1})
        finally:
            server.set_token(old)
        assert info.value.code == "auth_failed"
        assert info.value.message == MESSAGES["auth_failed"] + " (HTTP 401)"
        assert old not in str(info.value) + repr(info.value.args)
        assert session.opened == 1  # the same headers would be refused again: the caller renews them


def test_each_request_has_the_deadline() -> None:
    with McpTestServer() as server, session_to(server, timeout=1) as session:
        assert session.call_tool("slow", {"seconds": 0.6}).content[0]["text"] == "slept 0.6"
        assert session.call_tool("slow", {"seconds": 0.6}).content[0]["text"] == "slept 0.6"
        started = time.monotonic()
        with pytest.raises(McpError) as info:
            session.call_tool("slow", {"seconds": 3})
        assert info.value.code == "timeout"
        assert 0.9 <= time.monotonic() - started < 1.6


def test_a_slow_handshake_times_out_at_the_deadline() -> None:
    with McpTestServer(delay_seconds=3) as slow:
        session = session_to(slow, timeout=1)
        started = time.monotonic()
        with session, pytest.raises(McpError) as info:
            session.call_tool("add", {"a": 1, "b": 1})
        assert info.value.code == "timeout"
        assert time.monotonic() - started < 2.5


def test_a_guard_error_from_the_factory_propagates_unchanged() -> None:
    class Denied(Exception):
        code = "secret_destination_denied"

    denied = Denied()

    def guarded_factory(**kwargs: Any) -> httpx2.AsyncClient:
        raise denied

    with McpTestServer() as server, session_to(server, http_client_factory=guarded_factory) as session:
        with pytest.raises(Denied) as info:
            session.call_tool("add", {"a": 1, "b": 1})
        assert info.value is denied
        assert server.requests == []


def test_arguments_are_checked_when_the_session_is_made() -> None:
    with pytest.raises(ValueError, match="transport"):
        McpSession("http://127.0.0.1:9/mcp", transport="websocket", http_client_factory=plain_factory)
    with pytest.raises(ValueError, match="timeout"):
        McpSession("http://127.0.0.1:9/mcp", http_client_factory=plain_factory, timeout=0)


@pytest.mark.parametrize(("transport", "legacy"), [("streamable_http", False), ("streamable_http", True)])
def test_a_result_over_the_cap_is_response_too_large_and_the_next_call_works(
    transport: Transport, legacy: bool
) -> None:
    """The guard refuses an answer that declares more than the cap inside the SDK's background task;
    the request still learns why (not a generic protocol error), and the session goes on."""
    from functools import partial

    from app.egress import EgressPolicy, guarded_async_client

    cap = 20_000
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}), max_response_bytes=cap)
    factory = partial(guarded_async_client, policy, ())
    with (
        McpTestServer(transport=transport, legacy=legacy, token="tok-" + secrets.token_hex(12)) as running,
        session_to(running, http_client_factory=factory) as session,
    ):
        with pytest.raises(McpError) as info:
            session.call_tool("echo", {"text": "x" * (cap * 3 // 4)})
        assert info.value.code == "response_too_large"
        assert session.call_tool("echo", {"text": "small"}).content[0]["text"] == "small"
