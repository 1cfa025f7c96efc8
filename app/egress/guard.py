"""The egress guard: the one door for every outbound call that carries a secret.

MCP servers, LLM providers and the AI gateway are all reached through a client built here.
Each request such a client sends is checked (scheme, the secret's ``allowed_hosts``, every
resolved address) and then sent to the very address that was checked, so a DNS answer that
changes between the check and the connect (DNS rebinding) cannot redirect the secret. Redirects
are never followed. Refusals happen before any connection is opened and raise ``EgressError``
subclasses whose ``code`` is stable and whose ``message`` never holds a secret, a query string or a
server body.

Callers going through the MCP SDK get these errors wrapped in an ``ExceptionGroup`` (the SDK runs
its transport in a task group): unwrap with ``except* EgressError`` and re-raise a plain error.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio.to_thread
import httpx2

from app.egress.urls import DEFAULT_PORTS, UrlError, credential_query_names, split_host_pattern
from app.errors import WorkerError

if TYPE_CHECKING:
    from app.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
EventHooks = Mapping[str, list[Callable[..., Any]]]

# Credential endpoints of cloud instances: reaching one hands out the worker's own cloud identity,
# so they are refused even when an operator allows private networks. (AWS/GCP/Azure/OCI/DO share
# 169.254.169.254; fd00:ec2::254 is AWS over IPv6; 100.100.100.200 is Alibaba; 169.254.170.2 and
# 169.254.170.23 / fd00:ec2::23 are the ECS task and EKS pod-identity credential endpoints.)
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "fd00:ec2::254",
        "100.100.100.200",
        "169.254.170.2",
        "169.254.170.23",
        "fd00:ec2::23",
    )
)

# Ranges the stdlib flags do not all cover on 3.11: carrier-grade NAT is neither "private" nor
# "global", and IPv6 site-local is only visible through ``is_site_local``.
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")
# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): a gateway turns the last 32 bits into an
# IPv4 destination, so 64:ff9b::a9fe:a9fe would reach the metadata service.
_NAT64_NETWORKS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
# Deprecated IPv4-compatible form (::a.b.c.d); some stacks still route it as IPv4.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

_DEFAULT_PORTS = DEFAULT_PORTS
# What one response may hold unless the policy says otherwise (LATCHKEY_MAX_RESPONSE_BYTES).
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class EgressError(WorkerError):
    """An outbound call refused before any connection; ``message`` is safe to show and to log."""

    code: str = "egress_error"

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(self.code, message)
        # The destination host, for audit events; never the full URL (its query may hold a token).
        self.host = host


class EgressDeniedError(EgressError):
    """The scheme or a resolved address is refused by the egress policy."""

    code = "egress_denied"


class DestinationDeniedError(EgressError):
    """The host is outside the secret's ``allowed_hosts``."""

    code = "secret_destination_denied"


class EgressResolutionError(EgressError):
    """The host name did not resolve, so there is no address that could be checked."""

    code = "egress_unresolvable"


class ResponseTooLargeError(WorkerError):
    """A response went over the policy's ``max_response_bytes`` while it was read (the read stopped).

    Not an ``EgressError``: nothing was refused before sending. Clients map it to their own
    ``response_too_large`` error; ``message`` is safe to show (the host at most, never the URL).
    """

    code = "response_too_large"

    def __init__(self, limit: int, host: str | None = None, *, message: str | None = None) -> None:
        super().__init__(self.code, message or f"the response was larger than {limit} bytes")
        self.limit = limit
        self.host = host


@dataclass(frozen=True)
class EgressPolicy:
    """Operator policy for outbound calls (both relaxations are for dev and tests only)."""

    allow_private: bool = False
    allow_http_hosts: frozenset[str] = frozenset()
    # Bytes one response may carry on the wire; reading stops (ResponseTooLargeError) past it.
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def __post_init__(self) -> None:
        # A bare string would be iterated character by character and silently allow nothing sensible.
        if isinstance(self.allow_http_hosts, str):
            raise TypeError("allow_http_hosts must be a collection of host names, not a string")
        # Normalised once so "LocalHost.", "[::1]" or "0:0::1" in config match the parsed URL host.
        hosts = frozenset(_normalize_host(h) for h in self.allow_http_hosts)
        object.__setattr__(self, "allow_http_hosts", hosts - {""})

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        """Build the policy from ``LATCHKEY_EGRESS_ALLOW_PRIVATE`` / ``LATCHKEY_EGRESS_ALLOW_HTTP_HOSTS``."""
        return cls(
            allow_private=settings.egress_allow_private,
            allow_http_hosts=frozenset(settings.egress_allow_http_hosts),
            max_response_bytes=settings.max_response_bytes,
        )


@dataclass(frozen=True)
class Destination:
    """A checked destination: the addresses listed are the only ones a guarded client connects to."""

    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _normalize_host(host: str) -> str:
    """Lowercase, unbracketed, without a trailing dot, IDNA-encoded; IP literals in canonical form."""
    h = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        pass
    if not h.isascii():
        # URL hosts arrive IDNA-encoded (httpx2 raw_host), so a unicode pattern must be encoded to match.
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return h


def host_matches(host: str, patterns: Sequence[str], *, port: int | None = None, scheme: str = "https") -> bool:
    """True if ``host`` equals a pattern or is a subdomain (any depth) of a ``*.suffix`` pattern,
    and the port matches: a pattern's own ``:port``, or for a pattern without one, only the
    scheme's default port (``port=None`` means the default port)."""
    if isinstance(patterns, str):
        raise TypeError("patterns must be a sequence of host patterns, not a string")
    name = _normalize_host(host)
    if not name:
        return False
    default_port = _DEFAULT_PORTS.get(scheme)
    actual_port = default_port if port is None else port
    for entry in patterns:
        try:
            raw, pinned = split_host_pattern(entry)
        except UrlError:
            continue  # an unreadable entry allows nothing
        if actual_port != (default_port if pinned is None else pinned):
            continue
        pattern = _normalize_host(raw)
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.com": the bare suffix itself is not a subdomain of itself
            # A lone "*." must not turn into "allow everything".
            if len(suffix) > 1 and name.endswith(suffix) and len(name) > len(suffix):
                return True
        elif pattern and name == pattern:
            return True
    return False


def _effective_forms(ip: IPAddress) -> list[IPAddress]:
    """Every address a packet to ``ip`` may really reach: itself, or the IPv4 it translates or tunnels to."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return [ip]
    # Translations: the packet leaves as IPv4, so only the IPv4 address counts. Judging the IPv6
    # wrapper too would refuse every public host on a DNS64/NAT64 (IPv6-only) network.
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if any(ip in net for net in _NAT64_NETWORKS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    # Tunnels (6to4, Teredo, IPv4-compatible): both the IPv6 address and what it carries must pass.
    forms: list[IPAddress] = [ip]
    if ip.sixtofour is not None:
        forms.append(ip.sixtofour)
    if ip.teredo is not None:
        forms.extend(ip.teredo)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        forms.append(ipaddress.IPv4Address(int(ip)))
    return forms


def _is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
        or not ip.is_global
    ):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return not ip.is_site_local
    return ip not in _SHARED_ADDRESS_SPACE


def _refusal(ip: IPAddress, policy: EgressPolicy) -> str | None:
    """Why ``ip`` is refused under ``policy`` (a short safe phrase), or None if it is allowed."""
    forms = _effective_forms(ip)
    if any(form in METADATA_ADDRESSES for form in forms):
        return "a cloud metadata address"
    if policy.allow_private or all(_is_public(form) for form in forms):
        return None
    return "a non-public address"


def _parse_address(text: str) -> IPAddress:
    """Parse an address from getaddrinfo, dropping an IPv6 zone id so set lookups compare equal."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def _resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses in resolver order, deduplicated; a literal IP resolves to itself."""
    try:
        return [_parse_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        # Chained for debugging: the resolver's error holds the host name at most, never the URL.
        raise EgressResolutionError(f"host {host} could not be resolved", host=host) from exc
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = _parse_address(str(sockaddr[0]))
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise EgressResolutionError(f"host {host} has no usable address", host=host)
    return addresses


HostRules = tuple[tuple[str, ...], ...]


def host_rules_of(allowed_hosts: Sequence[str] | None, host_rules: Sequence[Sequence[str]] = ()) -> HostRules:
    """Every non-empty host list a destination must match: ``allowed_hosts`` (one secret's) and ``host_rules``
    (one per secret a request carries). An empty list restricts nothing, so it is dropped."""
    if isinstance(allowed_hosts, str):
        raise TypeError("allowed_hosts must be a sequence of host patterns, not a string")
    if isinstance(host_rules, str) or any(isinstance(rule, str) for rule in host_rules):
        raise TypeError("host_rules must be a sequence of sequences of host patterns")
    rules = [tuple(allowed_hosts)] if allowed_hosts else []
    rules += [tuple(rule) for rule in host_rules if rule]
    return tuple(rules)


def check_destination(
    url: str | httpx2.URL,
    policy: EgressPolicy,
    allowed_hosts: Sequence[str] | None = None,
    *,
    host_rules: Sequence[Sequence[str]] = (),
) -> Destination:
    """Refuse ``url`` unless its scheme, host and every resolved address are allowed; return what was checked.

    ``allowed_hosts`` is one secret's host list; ``host_rules`` holds one list per secret when a
    request carries several (header credentials). The host must match *every* non-empty list;
    None or empty means that secret does not restrict hosts.
    """
    rules = host_rules_of(allowed_hosts, host_rules)
    try:
        parsed = url if isinstance(url, httpx2.URL) else httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError, ValueError):
        # "from None": the parser's message may quote the URL, query string and all.
        raise EgressDeniedError("the destination URL is not valid") from None

    scheme = parsed.scheme
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise EgressDeniedError("the destination URL has no host")
    if scheme == "http":
        if _normalize_host(host) not in policy.allow_http_hosts:
            raise EgressDeniedError(f"plain http is not allowed for host {host}; use https", host=host)
    elif scheme != "https":
        raise EgressDeniedError(f"scheme {scheme[:16]!r} is not allowed; use https", host=host)
    if parsed.userinfo:
        raise EgressDeniedError("credentials in the destination URL are not allowed", host=host)
    if parsed.query and credential_query_names(parsed.query.decode("ascii", "replace")):
        raise EgressDeniedError("a credential in the destination URL's query is not allowed", host=host)
    port = parsed.port or _DEFAULT_PORTS[scheme]
    # Before DNS: a secret must not even cause a lookup of a name it may not be sent to.
    refused = sum(1 for rule in rules if not host_matches(host, rule, port=port, scheme=scheme))
    if refused:
        where = host if port == _DEFAULT_PORTS[scheme] else f"{host} port {port}"
        if len(rules) == 1:
            raise DestinationDeniedError(f"host {where} is not in the secret's allowed hosts", host=host)
        raise DestinationDeniedError(
            f"host {where} is not in the allowed hosts of {refused} of the {len(rules)} secrets sent with it",
            host=host,
        )

    addresses = _resolve(host, port)
    # Every address, not just the first: a resolver may hand them out in any order.
    for ip in addresses:
        reason = _refusal(ip, policy)
        if reason is not None:
            raise EgressDeniedError(f"host {host} resolves to {reason}", host=host)
    return Destination(scheme=scheme, host=host, port=port, addresses=tuple(str(ip) for ip in addresses))


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _pinned_request(request: httpx2.Request, destination: Destination, address: str) -> httpx2.Request:
    """A copy of ``request`` aimed at ``address``, still presenting the original host to the server."""
    headers = request.headers.copy()
    if "host" not in headers:
        # httpx2 sets Host when it builds a request; keep virtual hosting intact for hand-built ones too.
        headers["Host"] = request.url.netloc.decode("ascii")
    extensions = dict(request.extensions)
    if destination.scheme == "https" and not _is_ip_literal(destination.host):
        # httpcore uses this for the TLS server_hostname: SNI and certificate verification stay on
        # the real name even though the socket goes to a literal IP.
        extensions["sni_hostname"] = destination.host
    # copy_with brackets an IPv6 literal itself.
    url = request.url.copy_with(host=address)
    # A new Request (not a mutation) so the caller's request, response.request and logs keep the real URL.
    return httpx2.Request(request.method, url, headers=headers, stream=request.stream, extensions=extensions)


def _check_declared(response: httpx2.Response, limit: int, host: str) -> None:
    """Refuse before reading: a declared length over the cap, or a body the cap cannot bound.

    Guarded clients ask for ``Accept-Encoding: identity``; a compressed answer could inflate far
    past the cap after the bytes were counted, so one is refused rather than decoded.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ResponseTooLargeError(limit, host)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ResponseTooLargeError(
            limit, host, message="the response is compressed although it was asked for uncompressed; refused"
        )


class _CappedStream(httpx2.SyncByteStream):
    """The response body as it arrives, stopped with ResponseTooLargeError once it passes ``limit``."""

    def __init__(self, inner: httpx2.SyncByteStream, limit: int, host: str) -> None:
        self._inner, self._limit, self._host = inner, limit, host

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise ResponseTooLargeError(self._limit, self._host)
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _AsyncCappedStream(httpx2.AsyncByteStream):
    """Async twin of ``_CappedStream`` (the MCP SDK's streams, SSE included)."""

    def __init__(self, inner: httpx2.AsyncByteStream, limit: int, host: str) -> None:
        self._inner, self._limit, self._host = inner, limit, host

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise ResponseTooLargeError(self._limit, self._host)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


PoolT = TypeVar("PoolT")


def _inner_transport_kwargs(ssl_context: ssl.SSLContext) -> dict[str, Any]:
    # trust_env=False: a proxy from the environment must not reroute a secret-carrying call (it
    # would also connect by name, reopening the DNS gap). retries=0: the guard owns retrying.
    return {"verify": ssl_context, "trust_env": False, "retries": 0}


def _default_ssl_context(ssl_context: ssl.SSLContext | None) -> ssl.SSLContext:
    # One context per client, shared by its per-host pools: loading the CA bundle per host is slow.
    # httpx2's default verifies certificates and host names (and honours SSL_CERT_FILE/SSL_CERT_DIR).
    return ssl_context if ssl_context is not None else httpx2.create_ssl_context()


class _PerHostPools(Generic[PoolT]):
    """The policy and the per-host connection pools both guarded transports keep.

    Pools are per (scheme, host, port), not one shared pool: httpcore pools by URL origin,
    which after pinning is the IP, so two names on one IP would share a TLS connection whose
    certificate was only verified for the first name. The lock never spans an await.
    """

    def __init__(
        self,
        policy: EgressPolicy,
        allowed_hosts: Sequence[str] | None,
        ssl_context: ssl.SSLContext | None,
        make_pool: Callable[..., PoolT],
        host_rules: Sequence[Sequence[str]] = (),
    ) -> None:
        self._policy = policy
        self._host_rules = host_rules_of(allowed_hosts, host_rules)
        self._ssl_context = _default_ssl_context(ssl_context)
        self._make_pool = make_pool
        self._pools: dict[tuple[str, str, int], PoolT] = {}
        self._lock = threading.Lock()

    def _pool(self, destination: Destination) -> PoolT:
        key = (destination.scheme, destination.host, destination.port)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = self._make_pool(**_inner_transport_kwargs(self._ssl_context))
            return pool

    def _take_pools(self) -> list[PoolT]:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        return pools


class GuardedTransport(_PerHostPools[httpx2.HTTPTransport], httpx2.BaseTransport):
    """Sync transport: checks every request, then connects to the checked address only."""

    def __init__(
        self,
        policy: EgressPolicy,
        allowed_hosts: Sequence[str] | None = None,
        *,
        host_rules: Sequence[Sequence[str]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(policy, allowed_hosts, ssl_context, httpx2.HTTPTransport, host_rules)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Check ``request``; send it to the first checked address that accepts a connection."""
        destination = check_destination(request.url, self._policy, host_rules=self._host_rules)
        pool = self._pool(destination)
        last_error: httpx2.ConnectError | None = None
        for address in destination.addresses:
            try:
                response = pool.handle_request(_pinned_request(request, destination, address))
            except httpx2.ConnectError as exc:
                # Nothing was sent yet, so trying the next checked address is safe: the fallback a
                # name-based connect does across addresses, without a second lookup.
                last_error = exc
                continue
            return self._capped(response, destination)
        assert last_error is not None  # _resolve never returns an empty list
        raise last_error

    def _capped(self, response: httpx2.Response, destination: Destination) -> httpx2.Response:
        """The response with its body read through the size cap (refused at once if it declares more)."""
        limit = self._policy.max_response_bytes
        try:
            _check_declared(response, limit, destination.host)
        except ResponseTooLargeError:
            response.close()
            raise
        assert isinstance(response.stream, httpx2.SyncByteStream)
        response.stream = _CappedStream(response.stream, limit, destination.host)
        return response

    def close(self) -> None:
        """Close every per-host pool."""
        for pool in self._take_pools():
            pool.close()


class AsyncGuardedTransport(_PerHostPools[httpx2.AsyncHTTPTransport], httpx2.AsyncBaseTransport):
    """Async transport: checks every request, then connects to the checked address only."""

    def __init__(
        self,
        policy: EgressPolicy,
        allowed_hosts: Sequence[str] | None = None,
        *,
        host_rules: Sequence[Sequence[str]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(policy, allowed_hosts, ssl_context, httpx2.AsyncHTTPTransport, host_rules)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Check ``request`` (DNS in a worker thread); send it to the first checked address that accepts."""
        # getaddrinfo blocks, so it must not run on the event loop the MCP SDK streams on.
        destination = await anyio.to_thread.run_sync(
            partial(check_destination, request.url, self._policy, host_rules=self._host_rules)
        )
        pool = self._pool(destination)
        last_error: httpx2.ConnectError | None = None
        for address in destination.addresses:
            try:
                response = await pool.handle_async_request(_pinned_request(request, destination, address))
            except httpx2.ConnectError as exc:
                last_error = exc
                continue
            return await self._capped(response, destination)
        assert last_error is not None
        raise last_error

    async def _capped(self, response: httpx2.Response, destination: Destination) -> httpx2.Response:
        limit = self._policy.max_response_bytes
        try:
            _check_declared(response, limit, destination.host)
        except ResponseTooLargeError:
            await response.aclose()
            raise
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _AsyncCappedStream(response.stream, limit, destination.host)
        return response

    async def aclose(self) -> None:
        """Close every per-host pool."""
        for pool in self._take_pools():
            await pool.aclose()


def _client_kwargs(
    headers: Mapping[str, str] | None,
    timeout: httpx2.Timeout | float,
    event_hooks: EventHooks | None,
) -> dict[str, Any]:
    return {
        # Uncompressed: the size cap counts what arrives, and that is what is parsed.
        "headers": {"Accept-Encoding": "identity", **(headers or {})},
        "timeout": timeout,
        "event_hooks": event_hooks,
        "follow_redirects": False,
        # 0, not just follow_redirects=False: a per-request follow_redirects=True then fails with
        # TooManyRedirects instead of following, and the MCP SDK (which follows same-origin
        # redirects itself, up to client.max_redirects) follows none.
        "max_redirects": 0,
        "trust_env": False,
    }


def guarded_async_client(
    policy: EgressPolicy,
    allowed_hosts: Sequence[str] | None = None,
    *,
    host_rules: Sequence[Sequence[str]] = (),
    headers: Mapping[str, str] | None = None,
    timeout: httpx2.Timeout | float = 10.0,
    event_hooks: EventHooks | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` (e.g. for the MCP SDK) whose every request goes through the egress guard.

    ``host_rules``: one ``allowed_hosts`` list per secret the client's headers carry; the
    destination must match each non-empty one (and ``allowed_hosts``, if given).
    """
    transport = AsyncGuardedTransport(policy, allowed_hosts, host_rules=host_rules, ssl_context=ssl_context)
    return httpx2.AsyncClient(transport=transport, **_client_kwargs(headers, timeout, event_hooks))


def guarded_client(
    policy: EgressPolicy,
    allowed_hosts: Sequence[str] | None = None,
    *,
    host_rules: Sequence[Sequence[str]] = (),
    headers: Mapping[str, str] | None = None,
    timeout: httpx2.Timeout | float = 10.0,
    event_hooks: EventHooks | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx2.Client:
    """An ``httpx2.Client`` (for provider and gateway calls) whose every request goes through the egress guard."""
    transport = GuardedTransport(policy, allowed_hosts, host_rules=host_rules, ssl_context=ssl_context)
    return httpx2.Client(transport=transport, **_client_kwargs(headers, timeout, event_hooks))
