"""A small synchronous MCP client for Celery tasks: list a server's tools, call one tool.

`list_tools` and `call_tool` each open a fresh connection (Streamable HTTP or SSE) through an
httpx2 client made by the caller's `http_client_factory` (in production the egress-guarded
factory), run the MCP handshake and the request under one overall deadline, and close everything
again. They run their own event loop (`asyncio.run`), so they must be called from a thread with no
running loop (a Celery worker thread or process is fine). `McpSession` keeps one connection open
for many requests (an agent run's tool calls): one handshake, then one round trip per request,
with the same deadline and error mapping.

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
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, TypeVar

import anyio
import anyio.abc
import httpx2
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

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


class _RecordingTransport(httpx2.AsyncBaseTransport):
    """Passes every request on; remembers the coded errors (guard, size cap) the transport raised."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, exchange: _Exchange) -> None:
        self._inner = inner
        self._exchange = exchange

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            return await self._inner.handle_async_request(request)
        except Exception as exc:
            if getattr(exc, "code", None) is not None:
                self._exchange.transport_errors.append(exc)
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


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
        # The latest 401/403: kept here too, as a session's SDK turns the hook's exception into a generic error.
        self.rejected: _AuthRejected | None = None
        # Errors with a stable code the transport raised (the guard refusing a request, a response that
        # declared more than the cap): in a session the SDK's background task swallows them.
        self.transport_errors: list[BaseException] = []

    def reset(self) -> None:
        """Forget what the previous operation on this connection saw."""
        self.error_status, self.too_large, self.rejected = None, False, None
        self.transport_errors = []

    async def on_response(self, response: httpx2.Response) -> None:
        status = response.status_code
        if isinstance(response.stream, httpx2.AsyncByteStream):
            response.stream = _WatchedStream(response.stream, self)
        if status in (401, 403):
            self.rejected = _AuthRejected(status, response.headers.get("www-authenticate"))
            raise self.rejected
        # The latest status of a message POST, if it was an error: reported with a protocol_error (e.g. a 404
        # from a non-MCP URL). GETs are left out: a 405 on the optional Streamable HTTP GET stream is normal.
        if response.request.method == "POST":
            self.error_status = status if status >= 400 else None

    def http_client(self) -> httpx2.AsyncClient:
        client = self.factory(
            headers=dict(self.headers),
            timeout=httpx2.Timeout(self.timeout),
            event_hooks={"response": [self.on_response]},
        )
        client._transport = _RecordingTransport(client._transport, self)
        return client

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


def _failure(leaves: list[BaseException], exchange: _Exchange, what: str, *, deadline_hit: bool) -> BaseException:
    """What a failed operation raises: the guard's own error unchanged, else an `McpError`.

    ``leaves`` are the failure's exceptions (none when the deadline passed with nothing raised).
    """
    # What the transport raised comes first: in a session the request only sees the SDK's generic error.
    leaves = [*(e for e in exchange.transport_errors if e not in leaves), *leaves]
    guard_error = next((leaf for leaf in leaves if _is_guard_error(leaf)), None)
    if guard_error is not None:
        return guard_error
    if exchange.rejected is not None and not any(isinstance(leaf, _AuthRejected) for leaf in leaves):
        leaves = [exchange.rejected, *leaves]

    if not leaves:
        if exchange.too_large:
            log.info("MCP %s failed: response_too_large", what)
            return McpError.for_code("response_too_large")
        log.info("MCP %s failed: timeout after %ss", what, exchange.timeout)
        return McpError.for_code("timeout")
    error = _classify(
        leaves, deadline_hit=deadline_hit, error_status=exchange.error_status, too_large=exchange.too_large
    )
    names = ", ".join(sorted({type(leaf).__name__ for leaf in leaves}))
    log.info("MCP %s failed: %s (%s)", what, error.code, names)
    return error


async def _guarded(operation: Callable[[_Exchange], Awaitable[_T]], exchange: _Exchange, what: str) -> _T:
    exchange.reset()
    scope = anyio.move_on_after(exchange.timeout)
    failure: BaseException | None = None
    try:
        with scope:
            return await operation(exchange)
    except Exception as exc:
        failure = _failure(_leaves(exc), exchange, what, deadline_hit=scope.cancel_called)
        if isinstance(failure, McpError):
            raise failure from None
    # A guard error is raised outside the except block, so it reaches the caller exactly as the factory raised it.
    raise failure if failure is not None else _failure([], exchange, what, deadline_hit=True)


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


async def _all_tools(client: Client) -> list[ToolInfo]:
    """Every tool the server lists, following `nextCursor` (a repeated or endless cursor is a protocol error)."""
    tools: list[ToolInfo] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_TOOL_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(
            ToolInfo(name=t.name, description=t.description, input_schema=dict(t.input_schema)) for t in page.tools
        )
        cursor = page.next_cursor
        if not cursor:
            return tools
        if cursor in seen:
            raise _ProtocolViolation("tools/list cursor repeated")
        seen.add(cursor)
    raise _ProtocolViolation("tools/list did not end")


async def _tool_result(client: Client, name: str, arguments: dict[str, Any]) -> ToolResult:
    result = await client.call_tool(name, arguments)
    return ToolResult(
        is_error=bool(result.is_error),
        content=[block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content],
        structured=result.structured_content,
    )


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
        async with exchange.connect(url, kind) as client:
            return await _all_tools(client)

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
            return await _tool_result(client, name, arguments)

    return _run(operation, _Exchange(token, timeout, http_client_factory, headers), "tools/call")


class _Connection:
    """One open SDK `Client`, held by a task of the session's event loop until `stop` is set."""

    def __init__(self, client: Client, stop: anyio.Event) -> None:
        self.client = client
        self.stop = stop
        self.ended = False  # the holding task has returned: the server or the transport ended it
        self.lost = False  # a request learnt that the connection is closed (e.g. the SSE stream ended)


def _is_connection_lost(leaf: BaseException) -> bool:
    if isinstance(leaf, MCPError):
        return leaf.code == CONNECTION_CLOSED
    return isinstance(leaf, (httpx2.TransportError, anyio.ClosedResourceError, anyio.BrokenResourceError))


async def _watched(operation: Callable[[Client], Awaitable[_T]], connection: _Connection, _exchange: _Exchange) -> _T:
    """Run ``operation`` on the connection's client, marking the connection lost if it failed for that."""
    try:
        return await operation(connection.client)
    except Exception as exc:
        if any(_is_connection_lost(leaf) for leaf in _leaves(exc)):
            connection.lost = True
        raise


class McpSession:
    """One MCP connection reused for many requests: a handshake once, then one round trip per request.

    Synchronous like the module functions: it runs its own event loop in a dedicated thread (an anyio
    blocking portal) that holds ONE SDK `Client` open, opened at the first request. `call_tool` and
    `list_tools` each run under the same deadline (`timeout`, the first one's including the handshake)
    and map failures exactly as the module functions do (`McpError`, or the guard's own error).

    A dead connection (the server ended it, forgot its session, or a transport error) is re-opened
    once and the request resent; if that fails too, its error surfaces. A request on a connection that
    was opened for it is never resent. The headers are fixed for the session's life: to send others
    (a renewed token), close it and open a new one. `close()` always ends the connection (the SDK
    sends its DELETE for a Streamable HTTP session id) and the thread; it never raises.

        with McpSession(url, headers=headers, http_client_factory=factory) as session:
            session.call_tool("add", {"a": 1, "b": 2})
    """

    def __init__(
        self,
        url: str,
        *,
        transport: str = "streamable_http",
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_client_factory: HttpClientFactory,
        timeout: float = 10.0,
    ) -> None:
        self._kind = _check_args(url, transport, timeout)
        self._url = url
        self._exchange = _Exchange(token, timeout, http_client_factory, headers)
        self._stack: ExitStack | None = None
        self._portal: BlockingPortal | None = None
        self._connection: _Connection | None = None
        self._holder: Future[None] | None = None
        self._closed = False
        self.opened = 0  # connections (handshakes) this session made

    def __enter__(self) -> McpSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def list_tools(self) -> list[ToolInfo]:
        """Every tool the server lists (following `nextCursor`), on this session's connection."""
        return self._request("tools/list", _all_tools)

    def call_tool(self, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Call one tool on this session's connection (a tool-level failure is `is_error`)."""
        return self._request("tools/call", partial(_tool_result, name=name, arguments=arguments))

    def close(self) -> None:
        """End the connection (bounded by the timeout) and the event loop's thread. Idempotent."""
        self._closed = True
        portal = self._portal
        try:
            self._drop()
            if portal is not None:
                portal.call(portal.stop, True)  # whatever is still running on the loop is cancelled
        except Exception as exc:  # never raised from a close
            log.info("MCP session close: %s", type(exc).__name__)
        finally:
            stack, self._stack, self._portal = self._stack, None, None
            if stack is not None:
                stack.close()

    # -- internals -------------------------------------------------------------------------------

    def _request(self, what: str, operation: Callable[[Client], Awaitable[_T]]) -> _T:
        if self._closed:
            raise RuntimeError("the MCP session is closed")
        for attempt in (1, 2):
            if self._connection is not None and self._connection.ended:
                self._drop()  # it died between requests: opening it again is this request's one re-open
            reused = self._connection is not None
            connection = self._connection or self._open()
            try:
                return self._on_loop(_guarded(partial(_watched, operation, connection), self._exchange, what))
            except McpError as exc:
                if attempt == 1 and reused and self._is_dead(exc, connection):
                    log.info("MCP %s: the session's connection is gone (%s); opening it again", what, exc.code)
                    self._drop()
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _is_dead(self, error: McpError, connection: _Connection) -> bool:
        """Whether a request failed because the connection it used is gone (so a new one may succeed).

        Not after a timeout (the server may still be working on it) nor an auth failure (the
        same headers would fail again), nor a too-large response.
        """
        if error.code in ("timeout", "auth_failed", "insufficient_scope", "response_too_large"):
            return False
        if error.code == "unreachable" or connection.ended or connection.lost:
            return True
        # A 404 from a server that served this session before: it forgot the session (e.g. it restarted).
        return error.code == "protocol_error" and self._exchange.error_status == 404

    def _loop(self) -> BlockingPortal:
        """The session's event loop (its thread is started at the first request)."""
        if self._portal is None:
            self._stack = ExitStack()
            self._portal = self._stack.enter_context(start_blocking_portal(name="latchkey-mcp-session"))
        return self._portal

    def _on_loop(self, coroutine: Awaitable[_T]) -> _T:
        async def run() -> _T:
            return await coroutine

        return self._loop().call(run)

    def _open(self) -> _Connection:
        """Open a connection (the handshake, under the deadline) on the session's loop."""
        self.opened += 1
        holder, started = self._loop().start_task(self._hold, name="latchkey-mcp-connection")
        connection: _Connection = started
        self._holder, self._connection = holder, connection
        return connection

    async def _hold(self, *, task_status: anyio.abc.TaskStatus[_Connection]) -> None:
        """Open the connection, hand it over, hold it open until it is stopped (or the server ends it).

        One cancel scope spans the whole connection, so the SDK's task groups inside it unwind in
        order: its deadline bounds the handshake, is lifted once the connection is up, and set
        again to bound the close.
        """
        exchange = self._exchange
        exchange.reset()
        stop = anyio.Event()
        scope = anyio.CancelScope(deadline=anyio.current_time() + exchange.timeout)
        connection: _Connection | None = None
        failure: BaseException | None = None
        try:
            with scope:
                async with exchange.connect(self._url, self._kind) as client:
                    scope.deadline = math.inf
                    connection = _Connection(client, stop)
                    task_status.started(connection)
                    await stop.wait()
                    scope.deadline = anyio.current_time() + exchange.timeout
        except Exception as exc:
            if connection is None:
                failure = _failure(_leaves(exc), exchange, "connect", deadline_hit=scope.cancel_called)
            else:
                names = ", ".join(sorted({type(leaf).__name__ for leaf in _leaves(exc)}))
                log.info("MCP session ended: %s", names)
        finally:
            if connection is not None:
                connection.ended = True
        if connection is None:
            if failure is None:
                failure = _failure([], exchange, "connect", deadline_hit=True)
            if isinstance(failure, McpError):
                raise failure from None
            raise failure

    def _drop(self) -> None:
        """Stop the connection's holding task (if any) and wait for it to close, bounded by the timeout."""
        connection, holder = self._connection, self._holder
        self._connection, self._holder = None, None
        if connection is None or holder is None or self._portal is None:
            return
        try:
            if not connection.ended:
                self._portal.call(connection.stop.set)
            holder.result(timeout=self._exchange.timeout + 1)
        except Exception as exc:  # never raised from a close: the connection is gone either way
            log.info("MCP session close: %s", type(exc).__name__)


__all__ = [
    "GUARD_CODES",
    "TRANSPORTS",
    "HttpClientFactory",
    "McpError",
    "McpSession",
    "ToolInfo",
    "ToolResult",
    "call_tool",
    "list_tools",
]
