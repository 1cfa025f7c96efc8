"""What a worker sends to an MCP server: its auth config (bearer secret, header templates) turned into headers.

The one place where a secret's value meets a header: ``{{secret}}`` is substituted here, at send
time, and nowhere else. What comes out (``ServerCredentials``) holds the headers for every
request to the server, one ``allowed_hosts`` rule per secret used (the egress guard requires the
destination to satisfy each non-empty one), the reads to record on the job, and the plaintexts
for the run's masker. Runs on workers only; the web tier never builds one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from app.errors import WorkerError
from app.jobs.context import Worker
from app.mcp import grants
from app.mcp.catalog import PLACEHOLDER
from app.models import McpServer
from app.secrets.resolver import Resolved

__all__ = [
    "NO_CREDENTIALS",
    "HeaderSpec",
    "InvalidHeaderValueError",
    "ServerCredentials",
    "bearer_headers",
    "header_specs",
    "server_credentials",
    "static_credentials",
]

# What HTTP cannot carry in a field value, or would read as the end of it: CR, LF, NUL and every
# other control character, and anything outside ASCII (the client encodes headers as ASCII).
_SENDABLE: Final = frozenset(chr(c) for c in range(0x20, 0x7F)) | {"\t"}


class InvalidHeaderValueError(WorkerError):
    """A resolved secret cannot go into a header (a line break, control or non-ASCII character); nothing was sent."""

    code = "invalid_header_value"

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)


@dataclass(frozen=True)
class HeaderSpec:
    """One credential header as stored: ``name: template``, the template holding ``{{secret}}`` once."""

    name: str
    template: str
    secret_ref: str


def header_specs(server: McpServer) -> tuple[HeaderSpec, ...]:
    """The server's credential headers, in their order (read while the row's session is open)."""
    return tuple(HeaderSpec(h.name, h.template, h.secret_ref) for h in server.headers)


@dataclass(frozen=True)
class ServerCredentials:
    """What goes with every request to one MCP server. Never logged: its repr names no header value."""

    headers: dict[str, str] = field(default_factory=dict, repr=False)
    # One allowed_hosts list per secret used; the destination must match EVERY non-empty one.
    host_rules: tuple[tuple[str, ...], ...] = ()
    # {"secret_id", "version"} per secret resolved (job and audit records).
    reads: tuple[dict[str, Any], ...] = ()
    # The plaintexts, for the run's masker / redact.register.
    values: tuple[str, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"ServerCredentials(headers={sorted(self.headers)!r}, host_rules={self.host_rules!r})"


NO_CREDENTIALS: Final = ServerCredentials()


def bearer_headers(token: str) -> dict[str, str]:
    """``Authorization: Bearer <token>``: what ``secret_ref`` (and a legacy raw token) is sent as."""
    return {"Authorization": f"Bearer {token}"}


def _sendable(value: str, what: str) -> str:
    if not all(c in _SENDABLE for c in value):
        raise InvalidHeaderValueError(
            f"the value of {what} cannot be sent in a header (it holds a line break, a control or a non-ASCII "
            "character): edit the secret"
        )
    return value


def static_credentials(
    resolve: Callable[[str], Resolved], secret_ref: str | None, headers: Sequence[HeaderSpec]
) -> ServerCredentials:
    """Resolve the server's secrets (each once) and build its headers: the bearer ``secret_ref``, then each header.

    ``resolve`` is the worker's resolver bound to the org (a run passes its per-run cache).
    A value that cannot be a header field raises ``InvalidHeaderValueError`` before anything
    is sent; its message names the secret's id, never its value.
    """
    resolved: dict[str, Resolved] = {}

    def value_of(ref: str) -> str:
        found = resolved.get(ref)
        if found is None:
            found = resolved[ref] = resolve(ref)
        return _sendable(found.value, f"secret {found.secret_id}")

    out: dict[str, str] = {}
    if secret_ref is not None:
        out.update(bearer_headers(value_of(secret_ref)))
    for spec in headers:
        # The template was checked when it was stored (catalog.header_template); checked again here,
        # on the worker, so a row written around the API cannot smuggle a line break either.
        _sendable(spec.template, f"header {spec.name}")
        if spec.template.count(PLACEHOLDER) != 1:
            raise InvalidHeaderValueError(f"header {spec.name} must hold {PLACEHOLDER} exactly once")
        out[spec.name] = spec.template.replace(PLACEHOLDER, value_of(spec.secret_ref))
    return ServerCredentials(
        headers=out,
        host_rules=tuple(r.allowed_hosts for r in resolved.values()),
        reads=tuple({"secret_id": r.secret_id, "version": r.version} for r in resolved.values()),
        values=tuple(r.value for r in resolved.values()),
    )


def server_credentials(
    ctx: Worker,
    server: McpServer,
    user_id: str | None,
    resolve: Callable[[str], Resolved],
    headers: Sequence[HeaderSpec],
    *,
    force_refresh: bool = False,
) -> ServerCredentials:
    """Everything a call to ``server`` sends: its static credentials and, for an OAuth server, the
    access token of the connection ``user_id`` (or the org) holds (``app.mcp.grants``; refreshed
    when due, ``AuthRequiredError`` when there is none)."""
    static = static_credentials(resolve, server.secret_ref if server.auth_type == "static" else None, headers)
    if server.auth_type == "static":
        return static
    granted = grants.access(ctx, server, user_id, force_refresh=force_refresh)
    return ServerCredentials(
        headers={**static.headers, **bearer_headers(_sendable(granted.token, f"connection {granted.connection_id}"))},
        host_rules=static.host_rules + granted.host_rules,
        reads=(*static.reads, {"secret_id": granted.secret_id, "version": granted.version}),
        values=static.values + granted.values,
    )
