"""MCP connections on the worker: prepare an authorization, redeem its code, use, refresh and revoke tokens.

A connection's tokens are the sealed value of a secret of kind ``connection`` (one per
connection, a new version per refresh), so they are resolved like any secret: an L1 hit, or
one Redis GET on L2. The sealed JSON names the org, server and subject it belongs to and is
checked against the connection row on every use: a row pointed at another connection's secret
opens nothing. The secret's ``allowed_hosts`` are the MCP server's own host, so an access token
can only ever be sent to the server it was issued for.

A refresh is single-flight across every worker and process: a short Redis lock picks one
redeemer; the others wait and adopt the version it commits. The write itself is a compare-and-
set on the secret's version, and an ``invalid_grant`` seen while another worker's newer version
exists is adopted too, so a rotating refresh token is redeemed once and no job fails for it.
``invalid_grant`` (consent revoked, refresh token expired) moves the connection to
``auth_required`` and deletes its tokens in one transaction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

import redis
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.db import new_id, utcnow
from app.egress import EgressPolicy, guarded_client
from app.egress.urls import DEFAULT_PORTS
from app.errors import WorkerError
from app.jobs.context import Worker
from app.mcp.oauth import AuthServer, OAuthClient, OAuthError, TokenSet, discover, token_request
from app.models import ConnectionStatus, McpConnection, McpServer, Secret
from app.models.connections import ORG_SUBJECT, subject_of
from app.observability import redact
from app.secrets import cachekeys, invalidation
from app.secrets.sealing import encode_context, seal, secret_context

log = logging.getLogger("latchkey.oauth")
WORKER = RequestContext(Actor("worker"))

PAYLOAD_FORMAT: Final = "latchkey/mcp-connection/v1"
# Renew this long before expiry (at most a quarter of the token's life, for short-lived tokens).
REFRESH_MARGIN_SECONDS: Final = 30.0
# The single-flight lock: held at most this long, waited for at most this long.
LOCK_TTL_SECONDS: Final = 30.0
LOCK_WAIT_SECONDS: Final = 25.0
_T = TypeVar("_T")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class AuthRequiredError(WorkerError):
    """The server needs a connection the caller (or the org) does not have, or that lost its consent."""

    def __init__(self, server_name: str, reason: str = "needs a connection") -> None:
        super().__init__("auth_required", f"MCP server {server_name!r} {reason}: connect it and try again")


def subject_for(server: McpServer, user_id: str | None) -> str:
    """Whose connection a call uses (``subject_of``); a per-user server without a user is auth_required."""
    subject = subject_of(server, user_id)
    if subject is None:
        raise AuthRequiredError(server.name, "needs a user's own connection, and this job has no user")
    return subject


@functools.lru_cache(maxsize=4096)
def host_pattern(url: str) -> str:
    """The ``allowed_hosts`` entry that allows exactly this URL's host and port (a server URL, no secret)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    shown = f"[{host}]" if ":" in host else host
    port = parts.port
    if port is None or port == DEFAULT_PORTS.get(parts.scheme):
        return shown
    return f"{shown}:{port}"


def flow_context(org_id: str, flow_id: str, server_id: str, subject: str) -> bytes:
    return encode_context("oauth-flow", org_id, flow_id, server_id, subject)


def code_context(org_id: str, flow_id: str) -> bytes:
    return encode_context("oauth-code", org_id, flow_id)


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def new_state() -> str:
    return secrets.token_urlsafe(32)


# The sealed payload ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """Everything one connection's tokens need: the tokens, the client, the authorization server."""

    org_id: str
    server_id: str
    subject: str
    tokens: TokenSet
    client: OAuthClient
    auth_server: AuthServer
    resource: str
    grant_type: str = "authorization_code"

    def dumps(self) -> bytes:
        data = {
            "format": PAYLOAD_FORMAT,
            "org": self.org_id,
            "server": self.server_id,
            "subject": self.subject,
            "tokens": self.tokens.as_dict(),
            # A pre-registered client's secret is not copied here: it is resolved from its own
            # secret on every use, so rotating it takes effect at once.
            "client": self.client.stored(),
            "as": self.auth_server.stored(),
            "resource": self.resource,
            "grant_type": self.grant_type,
        }
        return json.dumps(data, separators=(",", ":")).encode("utf-8")

    @classmethod
    def loads(cls, raw: str, *, org_id: str, server_id: str, subject: str) -> Grant:
        """Parse a payload, refusing one that belongs to another org, server or subject."""
        try:
            data = json.loads(raw)
            ok = (
                data.get("format") == PAYLOAD_FORMAT
                and data.get("org") == org_id
                and data.get("server") == server_id
                and data.get("subject") == subject
            )
            if not ok:
                raise ValueError("bound elsewhere")
            return cls(
                org_id=org_id,
                server_id=server_id,
                subject=subject,
                tokens=TokenSet.from_dict(data["tokens"]),
                client=OAuthClient.from_stored(data["client"]),
                auth_server=AuthServer.from_stored(data["as"]),
                resource=data["resource"],
                grant_type=data.get("grant_type") or "authorization_code",
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("connection tokens of server %s (%s) do not belong to it: refused", server_id, subject)
            raise WorkerError("connection_invalid", "the connection's stored tokens do not belong to it") from None

    def with_tokens(self, tokens: TokenSet) -> Grant:
        return Grant(
            self.org_id,
            self.server_id,
            self.subject,
            tokens,
            self.client,
            self.auth_server,
            self.resource,
            self.grant_type,
        )


def _expires_soon(tokens: TokenSet, now: float) -> bool:
    return now >= _renew_at(tokens)


def _dt(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if epoch is not None else None


# Storing tokens ------------------------------------------------------------------------------------


def store(session: Session, ctx: Worker, connection: McpConnection, server: McpServer, grant: Grant) -> int:
    """Seal ``grant`` as the connection's next token version (a new secret on first connect); the version."""
    keys = ctx.resolver.keyring.public_set()
    now = utcnow()
    hosts = [host_pattern(server.url)]
    if connection.secret_id is None:
        secret_id = new_id()
        sealed = seal(keys, grant.dumps(), secret_context(connection.org_id, secret_id, 1))
        session.add(
            Secret(
                id=secret_id,
                org_id=connection.org_id,
                name=f"~connection:{connection.id}",
                kind="connection",
                ciphertext=sealed.ciphertext,
                key_id=sealed.key_id,
                version=1,
                allowed_hosts=hosts,
                created_by="worker",
                updated_by="worker",
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        connection.secret_id = secret_id
        version = 1
    else:
        row = session.execute(
            select(Secret.version).where(Secret.org_id == connection.org_id, Secret.id == connection.secret_id)
        ).one()
        written = _write_version(session, ctx, connection.org_id, connection.secret_id, row.version, grant, hosts)
        if written is None:  # pragma: no cover - the caller holds the connection row lock
            raise WorkerError("connection_conflict", "the connection changed while it was being written")
        version = written
    _mark_connected(connection, grant, now)
    return version


def _write_version(
    session: Session, ctx: Worker, org_id: str, secret_id: str, seen: int, grant: Grant, hosts: list[str]
) -> int | None:
    """Compare-and-set the next version over ``seen``; None when another writer got there first."""
    keys = ctx.resolver.keyring.public_set()
    version = seen + 1
    sealed = seal(keys, grant.dumps(), secret_context(org_id, secret_id, version))
    now = utcnow()
    result = session.execute(
        update(Secret)
        .where(Secret.org_id == org_id, Secret.id == secret_id, Secret.version == seen)
        .values(
            ciphertext=sealed.ciphertext,
            key_id=sealed.key_id,
            version=version,
            revision=Secret.revision + 1,
            allowed_hosts=hosts,
            updated_at=now,
            rotated_at=now,
            updated_by="worker",
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    _stage(session, org_id, secret_id)
    return version


def invalidate(session: Session, org_id: str, secret_id: str) -> None:
    """Make every worker drop what it holds of a connection's tokens (the value stays, its revision moves)."""
    session.execute(
        update(Secret)
        .where(Secret.org_id == org_id, Secret.id == secret_id)
        .values(revision=Secret.revision + 1)
        .execution_options(synchronize_session=False)
    )
    _stage(session, org_id, secret_id)


def _stage(session: Session, org_id: str, secret_id: str) -> None:
    """Stage the cache invalidation of the token secret's row as this transaction leaves it."""
    row = session.execute(select(Secret.version, Secret.revision).where(Secret.id == secret_id)).one()
    invalidation.stage(session, org_id, secret_id, cachekeys.pointer(row.version, row.revision))


def _mark_connected(connection: McpConnection, grant: Grant, now: datetime) -> None:
    connection.status = ConnectionStatus.CONNECTED
    connection.scopes = list(grant.tokens.scopes)
    connection.has_refresh_token = grant.tokens.refresh_token is not None
    connection.expires_at = _dt(grant.tokens.expires_at)
    connection.error_code = None
    connection.error_message = None
    connection.updated_at = now


def drop_tokens(session: Session, connection: McpConnection, status: ConnectionStatus, code: str, message: str) -> None:
    """The tokens are dead: delete them and record why (one transaction with the caller's other writes)."""
    secret_id = connection.secret_id
    connection.secret_id = None
    connection.status = status
    connection.has_refresh_token = False
    connection.expires_at = None
    connection.error_code = code
    connection.error_message = message[:1000]
    connection.updated_at = utcnow()
    session.flush()
    if secret_id is not None:
        session.execute(delete(Secret).where(Secret.org_id == connection.org_id, Secret.id == secret_id))
        invalidation.stage(session, connection.org_id, secret_id, cachekeys.DELETED)


# Using tokens ---------------------------------------------------------------------------------------


class Access(NamedTuple):
    """An access token ready to send, and what the job records about it (a NamedTuple: one per use)."""

    token: str
    secret_id: str
    version: int
    host_rules: tuple[tuple[str, ...], ...]
    values: tuple[str, ...]
    connection_id: str

    def __repr__(self) -> str:  # never the token
        return f"Access(connection_id={self.connection_id!r}, version={self.version})"

    @classmethod
    def of(cls, server: McpServer, connection_id: str, secret_id: str, version: int, tokens: TokenSet) -> Access:
        """The access token of ``tokens``, allowed only to ``server``'s own host."""
        return cls(
            tokens.access_token, secret_id, version, ((host_pattern(server.url),),), tokens.values(), connection_id
        )


def _client_secret(ctx: Worker, server: McpServer, client: OAuthClient) -> OAuthClient:
    """The pre-registered client's secret, resolved now (only ever sent where its secret allows)."""
    if server.oauth_client_secret_ref is None or client.client_id != server.oauth_client_id:
        return client
    resolved = ctx.resolver.resolve(server.org_id, server.oauth_client_secret_ref)
    method = server.oauth_client_auth or client.auth_method
    return OAuthClient(client.client_id, method, resolved.value, tuple(resolved.allowed_hosts), preregistered=True)


def client_factory(ctx: Worker) -> Any:
    policy = EgressPolicy.from_settings(ctx.settings)

    def factory(hosts: Sequence[str]) -> Any:
        # No hosts: the request carries no secret, or one that restricts no host.
        return guarded_client(policy, tuple(hosts) or None, timeout=ctx.settings.mcp_timeout_seconds)

    return factory


def _load_connection(session: Session, org_id: str, server_id: str, subject: str) -> McpConnection | None:
    return session.scalar(
        select(McpConnection).where(
            McpConnection.org_id == org_id, McpConnection.mcp_server_id == server_id, McpConnection.subject == subject
        )
    )


def _open(ctx: Worker, connection: McpConnection, *, current: bool = False) -> tuple[Grant, int]:
    assert connection.secret_id is not None
    resolve = ctx.resolver.resolve_current if current else ctx.resolver.resolve
    resolved = resolve(connection.org_id, connection.secret_id)
    key = (f"{id(ctx.resolver)}:{connection.id}:{resolved.secret_id}", resolved.version)
    grant = _cache.grants.get(key)
    if grant is None:
        grant = Grant.loads(
            resolved.value, org_id=connection.org_id, server_id=connection.mcp_server_id, subject=connection.subject
        )
        for value in grant.tokens.values():
            redact.register(value)
        _cache.put(_cache.grants, key, grant)
    return grant, resolved.version


class _Cache:
    """This process's copies of connection rows and parsed grants, valid while the resolver's cache epoch is.

    Every change that matters to a use stages a cache invalidation of the connection's secret
    (a new token version, tokens dropped, a disconnect), and an applied invalidation changes the
    epoch: so a use costs what the secret's resolve costs (an L1 hit, or one Redis GET), and a
    disconnect is seen by every worker before the request that made it returns.
    """

    MAX = 4096

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: OrderedDict[tuple[int, int, str, str, str], McpConnection] = OrderedDict()
        self.grants: OrderedDict[tuple[str, int], Grant] = OrderedDict()
        # (resolver, epoch, server, subject) -> (the last Access answered, when it is due for renewal)
        self.uses: OrderedDict[tuple[int, int, str, str], tuple[Access, float]] = OrderedDict()

    def put(self, store: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        with self.lock:
            store[key] = value
            store.move_to_end(key)
            while len(store) > self.MAX:
                store.popitem(last=False)


_cache = _Cache()


def _connection_for(ctx: Worker, server: McpServer, subject: str) -> McpConnection | None:
    epoch = ctx.resolver.cache_epoch()
    key = (id(ctx.resolver), epoch or 0, server.org_id, server.id, subject)
    if epoch is not None:
        cached = _cache.rows.get(key)
        if cached is not None:
            return cached
    with ctx.db.session() as s:
        connection = _load_connection(s, server.org_id, server.id, subject)
        if connection is not None:
            s.expunge(connection)
    if connection is not None and epoch is not None and connection.status == ConnectionStatus.CONNECTED:
        _cache.put(_cache.rows, key, connection)
    return connection


def access(ctx: Worker, server: McpServer, user_id: str | None, *, force_refresh: bool = False) -> Access:
    """A current access token for ``server`` on behalf of ``user_id`` (or the org); refreshed if due.

    The common case is one resolve of the token secret (an L1 hit or one Redis GET) confirming
    that the version answered last time, in this cache epoch, is still the current one.
    """
    subject = subject_for(server, user_id)
    resolver = ctx.resolver
    epoch = resolver.cache_epoch()
    use_key = (id(resolver), epoch or 0, server.id, subject)
    if epoch is not None and not force_refresh:
        hit = _cache.uses.get(use_key)
        if hit is not None and time.time() < hit[1]:
            granted = hit[0]
            if resolver.resolve(server.org_id, granted.secret_id).version == granted.version:
                return granted
    granted = _access(ctx, server, subject, force_refresh=force_refresh)
    if epoch is not None:
        grant = _cache.grants.get((f"{id(resolver)}:{granted.connection_id}:{granted.secret_id}", granted.version))
        if grant is not None:
            _cache.put(_cache.uses, use_key, (granted, _renew_at(grant.tokens)))
    return granted


def _renew_at(tokens: TokenSet) -> float:
    """When a token is due for renewal (``_expires_soon`` from then on)."""
    if tokens.expires_at is None:
        return float("inf")
    lifetime = max(0.0, tokens.expires_at - (tokens.issued_at or tokens.expires_at))
    return tokens.expires_at - min(REFRESH_MARGIN_SECONDS, lifetime / 4)


def _access(ctx: Worker, server: McpServer, subject: str, *, force_refresh: bool) -> Access:
    connection = _connection_for(ctx, server, subject)
    if server.auth_type == "oauth_client_credentials":
        if connection is None or connection.secret_id is None or connection.status != ConnectionStatus.CONNECTED:
            return _client_credentials(ctx, server, seen_version=None)
    elif connection is None or connection.status != ConnectionStatus.CONNECTED or connection.secret_id is None:
        reason = "needs a connection" if connection is None else f"connection is {connection.status}"
        if connection is not None and connection.status == ConnectionStatus.AUTH_REQUIRED:
            reason = "lost its authorization"
        raise AuthRequiredError(server.name, reason)
    grant, version = _open(ctx, connection)
    if force_refresh or _expires_soon(grant.tokens, time.time()):
        if server.auth_type == "oauth_client_credentials":
            return _client_credentials(ctx, server, seen_version=version)
        grant, version = _refresh(ctx, server, connection, grant, version)
    return Access.of(server, connection.id, connection.secret_id or "", version, grant.tokens)


class _Lock:
    """A short Redis lock naming one redeemer per connection (the worker Redis, shared by every worker)."""

    def __init__(self, ctx: Worker, connection_id: str) -> None:
        self.client = redis.Redis.from_url(
            ctx.settings.effective_worker_redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self.key = f"lk:oauth:refresh:{ctx.settings.queue}:{connection_id}"
        self.holder = secrets.token_hex(8)

    def acquire(self) -> bool:
        try:
            return bool(self.client.set(self.key, self.holder, nx=True, px=int(LOCK_TTL_SECONDS * 1000)))
        except redis.RedisError as exc:
            message = f"the refresh lock is unavailable ({type(exc).__name__})"
            raise WorkerError("refresh_lock_unavailable", message) from None

    def take(self, what: str, adopt: Callable[[], _T | None] = lambda: None) -> _T | None:
        """Take the lock; or, while another worker holds it, what ``adopt`` finds it committed.

        None: the lock is ours. Waits at most ``LOCK_WAIT_SECONDS``, then ``refresh_timeout``.
        """
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not self.acquire():
            adopted = adopt()
            if adopted is not None:
                return adopted
            if time.monotonic() > deadline:
                raise WorkerError("refresh_timeout", f"another worker's {what} did not finish in time")
            time.sleep(0.05)
        return None

    def release(self) -> None:
        try:
            self.client.eval(_RELEASE, 1, self.key, self.holder)
        except redis.RedisError:
            pass  # it expires on its own
        finally:
            self.client.close()


def _current_version(ctx: Worker, connection: McpConnection) -> tuple[int | None, ConnectionStatus | None]:
    with ctx.db.session() as s:
        row = s.execute(
            select(Secret.version, McpConnection.status)
            .join(
                Secret, (Secret.id == McpConnection.secret_id) & (Secret.org_id == McpConnection.org_id), isouter=True
            )
            .where(McpConnection.id == connection.id)
        ).first()
    if row is None:
        return None, None
    return row[0], row[1]


def _adopt(ctx: Worker, server: McpServer, connection: McpConnection, seen: int) -> tuple[Grant, int] | None:
    """The newer version another worker committed, if there is one now."""
    version, status = _current_version(ctx, connection)
    if status is not None and status != ConnectionStatus.CONNECTED:
        raise AuthRequiredError(server.name, "lost its authorization")
    if version is None:
        raise AuthRequiredError(server.name, "lost its authorization")
    if version > seen:
        return _open(ctx, connection, current=True)
    return None


def _refresh(ctx: Worker, server: McpServer, connection: McpConnection, grant: Grant, seen: int) -> tuple[Grant, int]:
    """Renew the access token once across every worker; the others wait and adopt its version."""
    if grant.tokens.refresh_token is None:
        with ctx.db.session() as s:
            row = s.get(McpConnection, connection.id, with_for_update=True)
            if row is not None:
                row.status = ConnectionStatus.EXPIRED
                row.updated_at = utcnow()
        raise AuthRequiredError(server.name, "has an expired token and no refresh token")
    lock = _Lock(ctx, connection.id)
    try:
        adopted = lock.take("token refresh", lambda: _adopt(ctx, server, connection, seen))
        if adopted is not None:
            return adopted
        # Holding the lock: someone may have finished just before we took it.
        adopted = _adopt(ctx, server, connection, seen)
        if adopted is not None:
            return adopted
        return _redeem(ctx, server, connection, grant, seen)
    finally:
        lock.release()


def _redeem(ctx: Worker, server: McpServer, connection: McpConnection, grant: Grant, seen: int) -> tuple[Grant, int]:
    client = _client_secret(ctx, server, grant.client)
    form = {
        "grant_type": "refresh_token",
        "refresh_token": grant.tokens.refresh_token or "",
        "resource": grant.resource,
    }
    try:
        tokens = token_request(client_factory(ctx), grant.auth_server, client, form)
    except OAuthError as exc:
        if exc.code != "invalid_grant":
            raise
        # A rotating token another worker redeemed (its lock lapsed): adopt its version.
        adopted = _adopt(ctx, server, connection, seen)
        if adopted is not None:
            return adopted
        with ctx.db.session() as s:
            row = s.get(McpConnection, connection.id, with_for_update=True)
            if row is not None and row.secret_id == connection.secret_id:
                drop_tokens(s, row, ConnectionStatus.AUTH_REQUIRED, exc.code, exc.message)
            audit.record(
                s,
                WORKER,
                "mcp_connection.refresh_failed",
                org_id=connection.org_id,
                target_type="mcp_server",
                target_id=server.id,
                details={"connection_id": connection.id, "subject": connection.subject, "code": exc.code},
            )
        raise AuthRequiredError(server.name, "lost its authorization (the refresh was refused)") from None
    if tokens.refresh_token is None:
        # RFC 6749 §6: no new refresh token means the old one stays valid.
        tokens = TokenSet(
            tokens.access_token,
            grant.tokens.refresh_token,
            tokens.expires_at,
            tokens.issued_at,
            tokens.scopes or grant.tokens.scopes,
        )
    for value in tokens.values():
        redact.register(value)
    renewed = grant.with_tokens(tokens)
    with ctx.db.session() as s:
        row = s.get(McpConnection, connection.id, with_for_update=True)
        if row is None or row.secret_id != connection.secret_id:
            raise AuthRequiredError(server.name, "was disconnected")
        version = _write_version(
            s, ctx, row.org_id, connection.secret_id or "", seen, renewed, [host_pattern(server.url)]
        )
        if version is None:
            raise WorkerError("connection_conflict", "another worker wrote the connection's tokens first")
        _mark_connected(row, renewed, utcnow())
        audit.record(
            s,
            WORKER,
            "mcp_connection.refresh",
            org_id=row.org_id,
            target_type="mcp_server",
            target_id=server.id,
            details={"connection_id": row.id, "subject": row.subject, "version": version},
        )
    log.info("connection %s refreshed (version %s)", connection.id, version)
    return renewed, version


def _client_credentials(ctx: Worker, server: McpServer, *, seen_version: int | None) -> Access:
    """Machine to machine: a token from the client credentials grant, cached until it expires."""
    if not server.oauth_client_id or not server.oauth_client_secret_ref:
        raise WorkerError("oauth_not_configured", "the server's client credentials are not configured")
    lock = _Lock(ctx, f"cc:{server.id}")
    try:
        lock.take("token request")
        with ctx.db.session() as s:
            connection = _load_connection(s, server.org_id, server.id, ORG_SUBJECT)
            if connection is not None:
                s.expunge(connection)
        if (
            connection is not None
            and connection.secret_id is not None
            and connection.status == ConnectionStatus.CONNECTED
        ):
            grant, version = _open(ctx, connection, current=True)
            if (seen_version is None or version > seen_version) and not _expires_soon(grant.tokens, time.time()):
                return Access.of(server, connection.id, connection.secret_id, version, grant.tokens)
        with client_factory(ctx)(()) as http:
            found = discover(http, server.url)
        client = _client_secret(
            ctx, server, OAuthClient(server.oauth_client_id, server.oauth_client_auth or "client_secret_basic")
        )
        form = {"grant_type": "client_credentials", "resource": found.resource}
        scopes = server.oauth_scopes or list(found.scopes)
        if scopes:
            form["scope"] = " ".join(scopes)
        tokens = token_request(client_factory(ctx), found.server, client, form)
        for value in tokens.values():
            redact.register(value)
        grant = Grant(
            server.org_id,
            server.id,
            ORG_SUBJECT,
            tokens,
            OAuthClient(client.client_id, client.auth_method),
            found.server,
            found.resource,
            "client_credentials",
        )
        with ctx.db.session() as s:
            row = _load_connection(s, server.org_id, server.id, ORG_SUBJECT)
            if row is None:
                now = utcnow()
                row = McpConnection(
                    id=new_id(),
                    org_id=server.org_id,
                    mcp_server_id=server.id,
                    subject=ORG_SUBJECT,
                    user_id=None,
                    status=ConnectionStatus.CONNECTED,
                    scopes=[],
                    wanted_scopes=[],
                    connected_at=now,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
            live = s.get(McpServer, server.id)
            if live is None:
                raise WorkerError("not_found", "the MCP server no longer exists")
            version = store(s, ctx, row, live, grant)
            secret_id = row.secret_id or ""
            audit.record(
                s,
                WORKER,
                "mcp_connection.token",
                org_id=server.org_id,
                target_type="mcp_server",
                target_id=server.id,
                details={"connection_id": row.id, "grant_type": "client_credentials", "version": version},
            )
            connection_id = row.id
        return Access.of(server, connection_id, secret_id, version, tokens)
    finally:
        lock.release()


def want_scopes(ctx: Worker, server: McpServer, user_id: str | None, scopes: Sequence[str]) -> None:
    """A 403 ``insufficient_scope``: the next connect asks for the union of the granted and these scopes."""
    subject = subject_for(server, user_id)
    with ctx.db.session() as s:
        row = _load_connection(s, server.org_id, server.id, subject)
        if row is None:
            return
        wanted = list(row.wanted_scopes or [])
        for scope in [*row.scopes, *scopes]:
            if scope not in wanted:
                wanted.append(scope)
        row.wanted_scopes = wanted[:32]
        row.updated_at = utcnow()
        audit.record(
            s,
            WORKER,
            "mcp_connection.insufficient_scope",
            org_id=server.org_id,
            target_type="mcp_server",
            target_id=server.id,
            details={"connection_id": row.id, "subject": subject, "wanted_scopes": row.wanted_scopes},
        )
