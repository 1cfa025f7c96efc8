"""A small synchronous MCP client for Celery tasks: list a server's tools, call one tool.

Each call opens a fresh connection (Streamable HTTP or SSE) through an httpx2 client made by the
caller's `http_client_factory` (in production the egress-guarded factory), runs the MCP handshake
and the request under one overall deadline, and closes everything again. It runs its own event
loop (`asyncio.run`), so it must be called from a thread with no running loop (a Celery worker
thread or process is fine).

Failures surface as a plain `McpError` with a fixed, short message (at most an HTTP status is
added): never the server's response body, the token or the URL. It survives Celery's JSON
result serializer (`McpError(*args)` rebuilds it). An exception from the client factory's own
guard (any exception with a `code` of `egress_denied` or `secret_destination_denied`) is
re-raised unchanged so the caller can map it; the guard's `egress_unresolvable` (a DNS failure)
becomes `McpError("unreachable")`.

Credentials go in request headers: `token=` is the bearer shorthand (`Authorization: Bearer`),
`headers=` any others (what `app.mcp.credentials` built); a 401/403 is `auth_failed` either way.

`http_client_factory` must pass `event_hooks` on to the client it builds: the response hook is how
a 401/403 becomes `auth_failed` (the SDK itself reports only a generic JSON-RPC error).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio
import httpx2
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from app.errors import WorkerError

log = logging.getLogger("latchkey.mcp")

Transport = Literal["streamable_http", "sse"]
TRANSPORTS: Final = ("streamable_http", "sse")

HttpClientFactory = Callable[..., httpx2.AsyncClient]
"""Called as `factory(headers=..., timeout=..., event_hooks=...)`; returns an unopened `httpx2.AsyncClient`."""

# Guard errors raised by the caller's http client factory: passed through untouched.
GUARD_CODES: Final = frozenset({"egress_denied", "secret_destination_denied"})
# The guard's "host did not resolve" is a DNS failure like any other: reported as unreachable.
UNREACHABLE_GUARD_CODES: Final = frozenset({"egress_unresolvable"})

# Limits on what a server can make us do while listing tools.
MAX_TOOL_PAGES: Final = 100

# The handshake: probe `server/discover`, fall back to the classic `initialize` (the SDK default).
_CONNECT_MODE: Final = "auto"

MESSAGES: Final = {
    "auth_failed": "the MCP server rejected the credentials",
    "insufficient_scope": "the MCP server needs more scopes than the connection was granted: reconnect",
    "unreachable": "the MCP server could not be reached",
    "timeout": "the MCP server did not answer in time",
    "protocol_error": "the server did not answer as an MCP server",
    "response_too_large": "the MCP server's response was too large",
}

_T = TypeVar("_T")


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str | None
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    is_error: bool
    content: list[dict[str, Any]]
    structured: Any | None


class McpError(WorkerError):
    """A failed MCP exchange. `code`: auth_failed, insufficient_scope, unreachable, timeout, protocol_error,
    response_too_large. ``scopes``: for insufficient_scope, what the server's 403 asked for (RFC 6750 §3)."""

    scopes: tuple[str, ...] = ()

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code, message if message is not None else MESSAGES.get(code, "MCP request failed"))

    @classmethod
    def for_code(cls, code: str, status: int | None = None) -> McpError:
        message = MESSAGES[code]
        if status is not None:
            message = f"{message} (HTTP {status})"
        return cls(code, message)


class _ProtocolViolation(Exception):
    """The server spoke MCP but broke its rules (e.g. an endless tools/list)."""


class _AuthRejected(Exception):
    """Raised by the response hook on a 401/403 so the status is not lost inside the SDK."""

    def __init__(self, status: int, challenge: str | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.challenge = challenge


class _WatchedStream(httpx2.AsyncByteStream):
    """A response body that tells the exchange when the guard's size cap stopped reading it.

    The SDK's SSE reader swallows errors of its stream (it logs them and the request then
    fails as a generic error), so the exchange learns of the cap here, not from the exception.
    """

    def __init__(self, inner: httpx2.AsyncByteStream, exchange: _Exchange) -> None:
        self._inner = inner
        self._exchange = exchange

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            if getattr(exc, "code", None) == "response_too_large":
                self._exchange.too_large = True
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Exchange:
    """One connection's settings and what the response hook saw."""

    def __init__(
        self, token: str | None, timeout: float, factory: HttpClientFactory, headers: Mapping[str, str] | None = None
    ) -> None:
        self.headers = _request_headers(token, headers)
        self.timeout = timeout
        self.factory = factory
        self.error_status: int | None = None
        self.too_large = False

    async def on_response(self, response: httpx2.Response) -> None:
        status = response.status_code
        if isinstance(response.stream, httpx2.AsyncByteStream):
            response.stream = _WatchedStream(response.stream, self)
        if status in (401, 403):
            raise _AuthRejected(status, response.headers.get("www-authenticate"))
        # The latest status of a message POST, if it was an error: reported with a protocol_error (e.g. a 404
        # from a non-MCP URL). GETs are left out: a 405 on the optional Streamable HTTP GET stream is normal.
        if response.request.method == "POST":
            self.error_status = status if status >= 400 else None

    def http_client(self) -> httpx2.AsyncClient:
        return self.factory(
            headers=dict(self.headers),
            timeout=httpx2.Timeout(self.timeout),
            event_hooks={"response": [self.on_response]},
        )

    def sdk_factory(
        self,
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        # The SSE transport builds its client itself; ours carries the headers, timeout and hook.
        return self.http_client()

    @asynccontextmanager
    async def connect(self, url: str, transport: Transport) -> AsyncIterator[Client]:
        if transport == "sse":
            streams: AbstractAsyncContextManager[Any] = sse_client(
                url, timeout=self.timeout, sse_read_timeout=self.timeout, httpx_client_factory=self.sdk_factory
            )
            async with Client(streams, mode=_CONNECT_MODE, cache=None) as client:
                yield client
        else:
            async with (
                self.http_client() as http,
                Client(streamable_http_client(url, http_client=http), mode=_CONNECT_MODE, cache=None) as client,
            ):
                yield client


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            found.extend(_leaves(inner))
        return found
    return [exc]


def _is_guard_error(exc: BaseException) -> bool:
    return getattr(exc, "code", None) in GUARD_CODES and not isinstance(exc, McpError)


_CHALLENGE_FIELD = re.compile(r'([a-z_]+)=(?:"([^"]*)"|([^\s,]+))')


def _challenge(header: str | None) -> tuple[str | None, tuple[str, ...]]:
    """A Bearer ``WWW-Authenticate`` challenge's ``error`` and ``scope`` (RFC 6750 §3)."""
    if not header:
        return None, ()
    fields = {m[1]: m[2] or m[3] for m in _CHALLENGE_FIELD.finditer(header[:4096])}
    scope = fields.get("scope") or ""
    return fields.get("error"), tuple(scope.split())[:32]


def _classify(
    leaves: list[BaseException], *, deadline_hit: bool, error_status: int | None, too_large: bool = False
) -> McpError:
    for leaf in leaves:
        if isinstance(leaf, _AuthRejected):
            error, scopes = _challenge(leaf.challenge)
            if leaf.status == 403 and error == "insufficient_scope":
                found = McpError.for_code("insufficient_scope", leaf.status)
                found.scopes = scopes
                return found
            return McpError.for_code("auth_failed", leaf.status)
    # The guard's size cap stopped a read (the SDK may then also time out waiting for the answer).
    if too_large or any(getattr(leaf, "code", None) == "response_too_large" for leaf in leaves):
        return McpError.for_code("response_too_large")
    if deadline_hit or any(isinstance(leaf, (TimeoutError, httpx2.TimeoutException)) for leaf in leaves):
        return McpError.for_code("timeout")
    for leaf in leaves:
        if isinstance(leaf, (httpx2.NetworkError, httpx2.ProxyError, httpx2.UnsupportedProtocol, httpx2.InvalidURL)):
            return McpError.for_code("unreachable")
        if isinstance(leaf, OSError):  # a connect failure that escaped httpx2's mapping
            return McpError.for_code("unreachable")
        if getattr(leaf, "code", None) in UNREACHABLE_GUARD_CODES:
            return McpError.for_code("unreachable")
    status = error_status
    for leaf in leaves:
        if isinstance(leaf, httpx2.HTTPStatusError):
            status = leaf.response.status_code
            break
    return McpError.for_code("protocol_error", status)


async def _guarded(operation: Callable[[_Exchange], Awaitable[_T]], exchange: _Exchange, what: str) -> _T:
    scope = anyio.move_on_after(exchange.timeout)
    guard_error: BaseException | None = None
    try:
        with scope:
            return await operation(exchange)
    except Exception as exc:
        leaves = _leaves(exc)
        guard_error = next((leaf for leaf in leaves if _is_guard_error(leaf)), None)
        if guard_error is None:
            error = _classify(
                leaves,
                deadline_hit=scope.cancel_called,
                error_status=exchange.error_status,
                too_large=exchange.too_large,
            )
            names = ", ".join(sorted({type(leaf).__name__ for leaf in leaves}))
            log.info("MCP %s failed: %s (%s)", what, error.code, names)
            raise error from None
    if guard_error is not None:
        # Raised outside the except block, so it reaches the caller exactly as the factory raised it.
        raise guard_error
    if exchange.too_large:
        log.info("MCP %s failed: response_too_large", what)
        raise McpError.for_code("response_too_large")
    log.info("MCP %s failed: timeout after %ss", what, exchange.timeout)
    raise McpError.for_code("timeout")


def _run(operation: Callable[[_Exchange], Awaitable[_T]], exchange: _Exchange, what: str) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_guarded(operation, exchange, what))
    raise RuntimeError("app.mcp.client is synchronous: call it from a thread without a running event loop")


def _request_headers(token: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers of every request: ``token`` as the bearer shorthand, then the caller's own headers."""
    out = {"Authorization": f"Bearer {token}"} if token is not None else {}
    for name, value in (headers or {}).items():
        if token is not None and name.lower() == "authorization":
            raise ValueError("give either token or an Authorization header, not both")
        out[name] = value
    return out


def _check_args(url: str, transport: str, timeout: float) -> Transport:
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown MCP transport {transport!r}")
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    if not isinstance(url, str) or not url:
        raise ValueError("url is required")
    return "sse" if transport == "sse" else "streamable_http"


def list_tools(
    url: str,
    *,
    transport: str = "streamable_http",
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    http_client_factory: HttpClientFactory,
    timeout: float = 10.0,
) -> list[ToolInfo]:
    """Connect, handshake, and return every tool the server lists (following `nextCursor`)."""
    kind = _check_args(url, transport, timeout)

    async def operation(exchange: _Exchange) -> list[ToolInfo]:
        tools: list[ToolInfo] = []
        async with exchange.connect(url, kind) as client:
            cursor: str | None = None
            seen: set[str] = set()
            for _ in range(MAX_TOOL_PAGES):
                page = await client.list_tools(cursor=cursor)
                tools.extend(
                    ToolInfo(name=t.name, description=t.description, input_schema=dict(t.input_schema))
                    for t in page.tools
                )
                cursor = page.next_cursor
                if not cursor:
                    return tools
                if cursor in seen:
                    raise _ProtocolViolation("tools/list cursor repeated")
                seen.add(cursor)
        raise _ProtocolViolation("tools/list did not end")

    return _run(operation, _Exchange(token, timeout, http_client_factory, headers), "tools/list")


def call_tool(
    url: str,
    name: str,
    arguments: dict[str, Any],
    *,
    transport: str = "streamable_http",
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    http_client_factory: HttpClientFactory,
    timeout: float = 10.0,
) -> ToolResult:
    """Connect, handshake, call one tool and return its result (a tool-level failure is `is_error`)."""
    kind = _check_args(url, transport, timeout)

    async def operation(exchange: _Exchange) -> ToolResult:
        async with exchange.connect(url, kind) as client:
            result = await client.call_tool(name, arguments)
        return ToolResult(
            is_error=bool(result.is_error),
            content=[block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content],
            structured=result.structured_content,
        )

    return _run(operation, _Exchange(token, timeout, http_client_factory, headers), "tools/call")


__all__ = [
    "GUARD_CODES",
    "TRANSPORTS",
    "HttpClientFactory",
    "McpError",
    "ToolInfo",
    "ToolResult",
    "call_tool",
    "list_tools",
]
