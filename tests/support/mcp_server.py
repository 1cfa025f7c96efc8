"""A real MCP server for tests, built with the official SDK and guarded by a bearer token.

`McpTestServer` runs the server under uvicorn in a background thread on 127.0.0.1 and a free
port, over either transport (Streamable HTTP at `/mcp`, SSE at `/sse`). It records every
bearer token it is sent (`seen_tokens`), lets a test change the accepted token at runtime
(`set_token`), can make every HTTP request slow (`delay_seconds`) for timeout tests, and can
split tools/list into pages (`page_size`) or make it never end (`endless_pages`).
Header credentials: `require_headers={"X-API-Key": "k1"}` answers 401 to any request without
exactly those headers (`bearer=False` drops the bearer check, e.g. for `Authorization: token ...`),
and `seen_headers` records every request's headers (names lower-cased).
Sessions: `requests` records every request as (HTTP method, JSON-RPC method or None); `handshakes()`
counts the connections a client opened (each starts with one `server/discover` probe);
`open_streams()` the SSE streams still open and `open_connections()` the TCP connections.
`legacy=True` (Streamable HTTP) refuses `server/discover`, so clients fall back to the classic `initialize`
handshake and a Streamable HTTP session id (closed with a DELETE; a restarted server answers 404
to the old id). A restart on the same port and token: `McpTestServer(port=old.port, token=old.token)`.
No pytest fixtures here: tests wrap it as they need.

    with McpTestServer(transport="sse") as server:
        list_tools(server.url, transport="sse", token=server.token, ...)

Standalone (foreground, Ctrl-C to stop):

    python -m tests.support.mcp_server --port 8765 --token T [--transport sse] [--delay 0]
"""

from __future__ import annotations

import argparse
import hmac
import json
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Literal

import anyio
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp_types import ListToolsResult, PaginatedRequestParams

Transport = Literal["streamable_http", "sse"]
PATHS: dict[str, str] = {"streamable_http": "/mcp", "sse": "/sse"}
WHOAMI = "latchkey-test-mcp-server"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TokenVerifier:
    """Accepts exactly one bearer token, which can be changed while the server runs."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return AccessToken(token=token, client_id="latchkey-tests", scopes=[])
        return None


async def _sleep_unless(stopping: threading.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, waking early when the server stops. True if it slept the whole time."""
    end = anyio.current_time() + seconds
    while not stopping.is_set():
        remaining = end - anyio.current_time()
        if remaining <= 0:
            return True
        await anyio.sleep(min(remaining, 0.05))
    return False


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """The request's whole body, and a receive that replays it before the rest (a disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _rpc_method(body: bytes) -> str | None:
    try:
        message = json.loads(body)
    except ValueError:
        return None
    return message.get("method") if isinstance(message, dict) else None


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _RecordAndDelay:
    """ASGI middleware: records the bearer token and JSON-RPC method of every HTTP request, then optionally sleeps."""

    def __init__(self, app: ASGIApp, owner: McpTestServer) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
            self.owner.seen_headers.append(seen)
            method: str | None = None
            if scope["method"] == "POST":
                body, receive = await _read_body(receive)
                method = _rpc_method(body)
            self.owner.requests.append((scope["method"], method))
            required = self.owner.require_headers
            if any(seen.get(name.lower()) != value for name, value in required.items()):
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            for name, value in scope.get("headers", []):
                if name.lower() == b"authorization":
                    raw = value.decode("latin-1")
                    scheme, _, token = raw.partition(" ")
                    self.owner.seen_tokens.append(token if scheme.lower() == "bearer" else raw)
            delay = self.owner.delay_seconds
            if delay > 0 and not await _sleep_unless(self.owner.stopping, delay):
                await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
            if self.owner.legacy and method == "server/discover":
                rpc_id = json.loads(body).get("id")
                error = {"code": -32601, "message": "Method not found"}
                await _send_json(send, 200, {"jsonrpc": "2.0", "id": rpc_id, "error": error})
                return
            if scope["method"] == "GET" and self.owner.transport == "sse":
                self.owner.streams += 1
                try:
                    await self.app(scope, receive, send)
                finally:
                    self.owner.streams -= 1
                return
        await self.app(scope, receive, send)


class _PagedServer(MCPServer):
    """MCPServer whose tools/list can be split into pages (`page_size`), or never end (`endless_pages`)."""

    page_size: int | None = None
    endless_pages: bool = False

    async def _handle_list_tools(self, ctx: Any, params: PaginatedRequestParams | None) -> ListToolsResult:
        tools = await self.list_tools()
        if self.endless_pages:
            return ListToolsResult(tools=tools[:1], next_cursor="again")
        if not self.page_size:
            return ListToolsResult(tools=tools)
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + self.page_size
        return ListToolsResult(tools=tools[start:end], next_cursor=str(end) if end < len(tools) else None)


def build_server(verifier: _TokenVerifier | None, resource_url: str, stopping: threading.Event) -> _PagedServer:
    """The test MCP server: four tools behind bearer auth (none when ``verifier`` is None)."""
    if verifier is None:
        mcp = _PagedServer("latchkey-test", log_level="WARNING")
    else:
        mcp = _PagedServer(
            "latchkey-test",
            token_verifier=verifier,
            auth=AuthSettings(
                issuer_url="http://127.0.0.1:9/",  # never contacted: the verifier is static
                resource_server_url=resource_url,
                validate_token_resource=False,
            ),
            log_level="WARNING",
        )

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def whoami() -> str:
        """Name this server (never the caller's token)."""
        return WHOAMI

    @mcp.tool()
    async def slow(seconds: float) -> str:
        """Sleep for the given number of seconds, then answer."""
        await _sleep_unless(stopping, seconds)
        return f"slept {seconds}"

    return mcp


class McpTestServer:
    """A real MCP server on 127.0.0.1 in a background thread. Use as a context manager or call start/stop."""

    def __init__(
        self,
        *,
        transport: Transport = "streamable_http",
        token: str | None = None,
        delay_seconds: float = 0.0,
        page_size: int | None = None,
        endless_pages: bool = False,
        port: int = 0,
        require_headers: dict[str, str] | None = None,
        bearer: bool = True,
        legacy: bool = False,
    ) -> None:
        if transport not in PATHS:
            raise ValueError(f"unknown transport {transport!r}")
        if legacy and transport != "streamable_http":
            raise ValueError("legacy (initialize only) is for Streamable HTTP: SSE answers over its stream")
        self.transport: Transport = transport
        self.delay_seconds = delay_seconds
        self.page_size = page_size
        self.endless_pages = endless_pages
        self.seen_tokens: list[str] = []
        self.seen_headers: list[dict[str, str]] = []
        self.require_headers: dict[str, str] = dict(require_headers or {})
        self.bearer = bearer
        self.legacy = legacy
        self.requests: list[tuple[str, str | None]] = []
        self.streams = 0  # SSE streams open right now
        self.stopping = threading.Event()
        self._verifier = _TokenVerifier(token or secrets.token_urlsafe(24))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port: int = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.url = self.base_url + PATHS[transport]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self._verifier.token

    def set_token(self, token: str) -> None:
        """Accept `token` (and only it) from now on."""
        self._verifier.token = token

    def handshakes(self) -> int:
        """Connections clients opened: each begins with one ``server/discover`` probe (legacy: then ``initialize``)."""
        return sum(1 for _http, method in self.requests if method == "server/discover")

    def methods(self) -> list[str]:
        """The JSON-RPC methods of the POSTs so far, in order."""
        return [method for http, method in self.requests if http == "POST" and method is not None]

    def open_streams(self) -> int:
        """SSE streams (GET /sse) still open."""
        return self.streams

    def open_connections(self) -> int:
        """TCP connections to the server still open."""
        return len(self._server.server_state.connections) if self._server is not None else 0

    def app(self) -> ASGIApp:
        mcp = build_server(self._verifier if self.bearer else None, self.url, self.stopping)
        mcp.page_size = self.page_size
        mcp.endless_pages = self.endless_pages
        if self.transport == "sse":
            inner: ASGIApp = mcp.sse_app(host="127.0.0.1")
        else:
            inner = mcp.streamable_http_app(host="127.0.0.1")
        return _RecordAndDelay(inner, self)

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app(),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
        )

    def start(self, wait: float = 10.0) -> McpTestServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._sock.listen(128)
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name=f"mcp-test-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("MCP test server failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("MCP test server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, wait: float = 5.0) -> None:
        self.stopping.set()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(wait)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(wait)
        self._sock.close()
        self._server = None
        self._thread = None

    def __enter__(self) -> McpTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Latchkey test MCP server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", required=True, help="the bearer token the server accepts")
    parser.add_argument("--transport", choices=sorted(PATHS), default="streamable_http")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before every HTTP request")
    args = parser.parse_args(argv)
    server = McpTestServer(transport=args.transport, token=args.token, delay_seconds=args.delay, port=args.port)
    print(f"MCP test server ({args.transport}) on {server.url}", flush=True)
    server._sock.listen(128)
    try:
        uvicorn.Server(server._config()).run(sockets=[server._sock])
    finally:
        server._sock.close()


if __name__ == "__main__":
    main()
