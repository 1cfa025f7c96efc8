"""A real local HTTP stand-in for the model APIs: OpenAI chat completions, Anthropic Messages, the AI gateway.

`LlmTestServer` serves, on 127.0.0.1 and a free port, in a background thread:

- `POST /v1/chat/completions`: the OpenAI (and OpenAI-compatible) chat completions API;
- `POST /v1/messages`: the Anthropic Messages API;
- `POST /{account_id}/{gateway_id}/compat/chat/completions`: the Cloudflare AI gateway compat endpoint
  (OpenAI wire format).

It RECORDS every request (`requests`: path, lowercased headers, parsed JSON body, raw body text) and
answers from a SCRIPT of turns consumed in order, rendered in the wire format of the route hit:

- `{"text": "..."}`: a text reply;
- `{"tool_calls": [{"name": ..., "arguments": {...}, "id"?: ...}]}`: tool calls (may be combined with
  "text"); an `arguments` string is sent verbatim (OpenAI routes), e.g. to send invalid JSON;
- `{"echo": True}`: a text reply repeating every string the request carried in its messages and
  system prompt (message contents, tool calls, tool results): proves what did (not) reach the model;
- `{"status": 401, "body": "..."}`: an HTTP error whose JSON error body carries the given text;
- `{"raw": "..."}`: a 200 whose body is exactly this text (e.g. malformed JSON);
- `{"stream_bytes": n}`: a 200 OpenAI-style reply whose text is n bytes of "x", streamed in 64 KiB
  chunks without a Content-Length (n = 0: endless, until the client hangs up); `streamed` records
  the bytes each such answer got out (oversized-response tests);
- `"delay_seconds": s` in any turn sleeps first; `"usage": {"input_tokens": i, "output_tokens": o}`
  overrides the reported usage (default: derived from the sizes of request and reply).

An empty script answers `{"text": "done"}`. The server also checks the requests the way the real APIs
would (400 with a reason otherwise): a tool result must answer a tool call made earlier in the
conversation (the Anthropic one: in the assistant message right before), OpenAI tool-call arguments
must be JSON strings, tools must be rendered in the route's format. When `api_key` / `gateway_token`
are set, a request without them in the right header gets a 401. `delay_seconds` on the server delays
every request. No pytest fixtures here: tests wrap it as they need.

    with LlmTestServer() as server:
        server.script([{"tool_calls": [{"name": "add", "arguments": {"a": 1}}]}, {"text": "2"}])
        ... base_url=server.url + "/v1" ...
        server.requests[0].body["messages"]

Standalone (foreground, Ctrl-C to stop):

    python -m tests.support.llm_server --port 8766 [--api-key K] [--gateway-token T] [--script '[{"text": "hi"}]']
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import re
import socket
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal

Route = Literal["openai", "anthropic", "gateway"]
Turn = dict[str, Any]

DEFAULT_TURN: Turn = {"text": "done"}
ECHO_PREFIX = "echo: "

_GATEWAY_PATH = re.compile(r"/([^/]+)/([^/]+)/compat/chat/completions")
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    route: Route | None  # None: a path none of the APIs serve
    headers: dict[str, str]  # names lowercased
    body: Any  # the parsed JSON, or None when the body was not JSON
    raw: str  # the body as text (UTF-8, undecodable bytes replaced)
    account_id: str | None = None  # gateway route only
    gateway_id: str | None = None


class _BadRequest(Exception):
    """The request breaks a rule the real API enforces; answered with a 400."""


def _route(path: str) -> tuple[Route | None, str | None, str | None]:
    if path == "/v1/chat/completions":
        return "openai", None, None
    if path == "/v1/messages":
        return "anthropic", None, None
    match = _GATEWAY_PATH.fullmatch(path)
    if match:
        return "gateway", match.group(1), match.group(2)
    return None, None, None


def _strings(value: Any) -> Iterable[str]:
    """Every string leaf of a JSON value, in document order (keys excluded)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def echo_text(body: Any) -> str:
    """What an `echo` turn answers: every string of the system prompt and the messages."""
    if not isinstance(body, dict):
        return ECHO_PREFIX
    seen = [*_strings(body.get("system")), *_strings(body.get("messages"))]
    return ECHO_PREFIX + " | ".join(seen)


# --- request checks (what the real APIs reject) ---------------------------------------------------


def _check_openai(body: Any) -> None:
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _BadRequest("model is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    call_ids: set[str] = set()
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise _BadRequest("every message needs a known role")
        if m["role"] == "assistant":
            for call in m.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(call, dict) or call.get("type") != "function" or not isinstance(function, dict):
                    raise _BadRequest("tool_calls entries must be {id, type: function, function}")
                if not isinstance(function.get("arguments"), str):
                    raise _BadRequest("function.arguments must be a JSON string")
                if not isinstance(call.get("id"), str) or not call["id"]:
                    raise _BadRequest("tool_calls entries need an id")
                call_ids.add(call["id"])
            if m.get("content") is None and not m.get("tool_calls"):
                raise _BadRequest("assistant content is required unless tool_calls is set")
        elif m["role"] == "tool":
            if m.get("tool_call_id") not in call_ids:
                raise _BadRequest("a tool message must answer an earlier tool call (tool_call_id)")
            if not isinstance(m.get("content"), str):
                raise _BadRequest("tool message content must be a string")
        elif not isinstance(m.get("content"), str):
            raise _BadRequest("message content must be a string")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            raise _BadRequest("tools, when present, must be a non-empty list")
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
                raise _BadRequest("tools entries must be {type: function, function: {name, ...}}")
            if not function.get("name"):
                raise _BadRequest("tools entries must be {type: function, function: {name, ...}}")
            if not isinstance(function.get("parameters", {}), dict):
                raise _BadRequest("function.parameters must be a JSON schema object")


def _check_anthropic(body: Any, headers: dict[str, str]) -> None:
    if "anthropic-version" not in headers:
        raise _BadRequest("anthropic-version header is required")
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _BadRequest("model is required")
    if not isinstance(body.get("max_tokens"), int):
        raise _BadRequest("max_tokens is required")
    if "system" in body and not isinstance(body["system"], (str, list)):
        raise _BadRequest("system must be a string or a list of text blocks")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    previous_tool_uses: set[str] = set()
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _BadRequest("messages roles must be user or assistant (system goes top-level)")
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            raise _BadRequest("message content must be a string or a non-empty list of blocks")
        tool_uses: set[str] = set()
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if not isinstance(block.get("text"), str) or not block["text"]:
                    raise _BadRequest("text content blocks must be non-empty")
            elif kind == "tool_use":
                if m["role"] != "assistant" or not isinstance(block.get("input"), dict):
                    raise _BadRequest("tool_use blocks belong to assistant messages and need an object input")
                if not isinstance(block.get("id"), str) or not block["id"]:
                    raise _BadRequest("tool_use blocks need an id")
                tool_uses.add(block["id"])
            elif kind == "tool_result":
                if m["role"] != "user" or block.get("tool_use_id") not in previous_tool_uses:
                    raise _BadRequest("tool_result must answer a tool_use of the previous assistant message")
            else:
                raise _BadRequest("unknown content block type")
        previous_tool_uses = tool_uses
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _BadRequest("tools must be a list")
        for tool in tools:
            if not isinstance(tool, dict) or not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
                raise _BadRequest("tools entries must be {name, description?, input_schema}")


# --- the server -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    # HTTP/1.0: one request per connection, so stopping never waits for an idle keep-alive socket.
    protocol_version = "HTTP/1.0"

    def do_POST(self) -> None:
        self.server.owner.handle(self)

    def do_GET(self) -> None:
        self.server.owner.handle(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read `requests`, not stderr


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: LlmTestServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up before the (delayed) answer is expected in tests.
        pass


class LlmTestServer:
    """The model API stand-in on 127.0.0.1 in a background thread. Context manager, or start/stop."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        gateway_token: str | None = None,
        delay_seconds: float = 0.0,
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.gateway_token = gateway_token
        self.delay_seconds = delay_seconds
        self.requests: list[RecordedRequest] = []
        self.stopping = threading.Event()
        self._turns: deque[Turn] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.streamed: list[int] = []
        self._httpd = _HttpServer(("127.0.0.1", port), self)
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # -- test controls --

    def script(self, turns: Iterable[Turn]) -> None:
        """Replace the script: these turns answer the next requests, in order."""
        turns = [dict(t) for t in turns]
        with self._lock:
            self._turns = deque(turns)

    def reset(self) -> None:
        """Forget recorded requests and the remaining script; delay and credentials stay."""
        with self._lock:
            self.requests.clear()
            self._turns.clear()

    @property
    def remaining(self) -> int:
        """Scripted turns not answered yet."""
        with self._lock:
            return len(self._turns)

    # -- lifecycle --

    def start(self) -> LlmTestServer:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"llm-test-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (a delayed answer in flight is dropped) and close the socket. Idempotent."""
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LlmTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (standalone use)."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self.stopping.set()
            self._httpd.server_close()

    # -- request handling --

    def handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = None
        path = handler.path.split("?", 1)[0]
        route, account_id, gateway_id = _route(path) if handler.command == "POST" else (None, None, None)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(
                RecordedRequest(handler.command, handler.path, route, headers, body, text, account_id, gateway_id)
            )
        if route is None:
            self._send(handler, 404, {"error": {"message": "not found", "type": "not_found"}})
            return
        auth_error = self._auth_error(route, headers)
        if auth_error is not None:
            self._send(handler, 401, self._error_body(route, 401, auth_error))
            return
        try:
            if route == "anthropic":
                _check_anthropic(body, headers)
            else:
                _check_openai(body)
        except _BadRequest as exc:
            self._send(handler, 400, self._error_body(route, 400, str(exc)))
            return
        with self._lock:
            turn = self._turns.popleft() if self._turns else dict(DEFAULT_TURN)
        delay = self.delay_seconds + float(turn.get("delay_seconds", 0.0))
        if delay > 0 and self.stopping.wait(delay):
            return  # stopping: drop the answer, the connection just closes
        if "stream_bytes" in turn:
            self._stream(handler, int(turn["stream_bytes"]))
            return
        if "status" in turn:
            status = int(turn["status"])
            self._send(handler, status, self._error_body(route, status, str(turn.get("body", "error"))))
        elif "raw" in turn:
            self._send_bytes(handler, 200, str(turn["raw"]).encode(), "application/json")
        elif route == "anthropic":
            self._send(handler, 200, self._anthropic_reply(body, turn, len(raw)))
        else:
            self._send(handler, 200, self._openai_reply(body, turn, len(raw)))

    def _auth_error(self, route: Route, headers: dict[str, str]) -> str | None:
        def same(given: str | None, expected: str) -> bool:
            return given is not None and hmac.compare_digest(given.encode(), expected.encode())

        gateway_auth = headers.get("cf-aig-authorization")
        if (
            route == "gateway"
            and self.gateway_token is not None
            and not same(gateway_auth, f"Bearer {self.gateway_token}")
        ):
            return "invalid gateway token"
        if self.api_key is not None:
            if route == "anthropic":
                if not same(headers.get("x-api-key"), self.api_key):
                    return "invalid x-api-key"
            elif not same(headers.get("authorization"), f"Bearer {self.api_key}"):
                return "Incorrect API key provided"
        return None

    @staticmethod
    def _error_body(route: Route, status: int, message: str) -> dict[str, Any]:
        if route == "anthropic":
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            return {"type": "error", "error": {"type": kind, "message": message}}
        return {"error": {"message": message, "type": "invalid_request_error", "code": status}}

    def _reply_parts(
        self, body: Any, turn: Turn, request_size: int
    ) -> tuple[str | None, list[dict[str, Any]], int, int]:
        text: str | None = echo_text(body) if turn.get("echo") else turn.get("text")
        calls = list(turn.get("tool_calls") or [])
        usage = turn.get("usage") or {}
        input_tokens = int(usage.get("input_tokens", max(1, request_size // 4)))
        output_tokens = int(usage.get("output_tokens", max(1, len(text or "") // 4) + 10 * len(calls)))
        return text, calls, input_tokens, output_tokens

    def _openai_reply(self, body: Any, turn: Turn, request_size: int) -> dict[str, Any]:
        text, calls, input_tokens, output_tokens = self._reply_parts(body, turn, request_size)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.get("id") or f"call_{next(self._ids)}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": call["arguments"]
                        if isinstance(call.get("arguments"), str)
                        else json.dumps(call.get("arguments") or {}),
                    },
                }
                for call in calls
            ]
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": 1700000000,
            "model": body.get("model") if isinstance(body, dict) else None,
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop", "logprobs": None}
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }

    def _anthropic_reply(self, body: Any, turn: Turn, request_size: int) -> dict[str, Any]:
        text, calls, input_tokens, output_tokens = self._reply_parts(body, turn, request_size)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        content.extend(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{next(self._ids)}",
                "name": call["name"],
                "input": call.get("arguments") or {},
            }
            for call in calls
        )
        return {
            "id": f"msg_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model") if isinstance(body, dict) else None,
            "content": content,
            "stop_reason": "tool_use" if calls else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }

    # An endless stream stops here anyway, so a client that never stops reading cannot hang a test.
    STREAM_SAFETY_BYTES = 512 * 1024 * 1024

    def _stream(self, handler: _Handler, total: int) -> None:
        chunk = b"x" * 65536
        sent = 0
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.end_headers()  # HTTP/1.0 and no Content-Length: the body ends when the connection does
            handler.wfile.write(b'{"choices": [{"message": {"role": "assistant", "content": "')
            while (total == 0 or sent < total) and sent < self.STREAM_SAFETY_BYTES and not self.stopping.is_set():
                piece = chunk if total == 0 else chunk[: total - sent]
                handler.wfile.write(piece)
                sent += len(piece)
            handler.wfile.write(b'"}, "finish_reason": "stop"}]}')
        except OSError:
            pass  # the client hung up (e.g. its size cap stopped the read)
        finally:
            with self._lock:
                self.streamed.append(sent)

    def _send(self, handler: _Handler, status: int, payload: Any) -> None:
        self._send_bytes(handler, status, json.dumps(payload).encode(), "application/json")

    @staticmethod
    def _send_bytes(handler: _Handler, status: int, data: bytes, content_type: str) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (e.g. its timeout fired during a delay)


def free_port() -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Latchkey model API stand-in on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--api-key", default=None, help="require this provider key (401 otherwise)")
    parser.add_argument("--gateway-token", default=None, help="require this gateway token on the gateway route")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before every answer")
    parser.add_argument("--script", default="[]", help='JSON list of turns, e.g. \'[{"text": "hi"}]\'')
    args = parser.parse_args(argv)
    server = LlmTestServer(
        api_key=args.api_key, gateway_token=args.gateway_token, delay_seconds=args.delay, port=args.port
    )
    server.script(json.loads(args.script))
    print(f"model API stand-in on {server.url}", flush=True)
    print(f"  openai / openai_compatible: base_url {server.url}/v1", flush=True)
    print(f"  anthropic:                  base_url {server.url}", flush=True)
    print(f"  cloudflare_ai_gateway:      gateway base URL {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
