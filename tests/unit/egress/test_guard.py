"""Egress guard: scheme, host and address policy; pinning to the checked address; no redirects.

Network rule for this file: traffic only ever goes to loopback. Name resolution is faked (the
autouse ``dns`` fixture) so no real DNS query leaves the machine, and every "public" address below
is only ever checked, never connected to.
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest

from app.config import Settings
from app.egress import (
    Destination,
    DestinationDeniedError,
    EgressDeniedError,
    EgressError,
    EgressPolicy,
    EgressResolutionError,
    ResponseTooLargeError,
    check_destination,
    guarded_async_client,
    guarded_client,
    host_matches,
)

PUBLIC_V4 = "93.184.215.14"  # globally routable; checked only, never connected to
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
LOCAL = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1", "localhost"}))
STRICT_HTTP = EgressPolicy(allow_private=False, allow_http_hosts=frozenset({"127.0.0.1", "localhost"}))


# --- fake DNS ---------------------------------------------------------------------------------


@dataclass
class FakeDNS:
    """Answers for made-up names, and how often each name was looked up."""

    answers: dict[str, Callable[[int], list[str]]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def add(self, name: str, *addresses: str) -> None:
        self.answers[name] = lambda _n: list(addresses)

    def add_sequence(self, name: str, first: list[str], then: list[str]) -> None:
        """The first lookup answers ``first``, every later one ``then`` (a rebinding name)."""
        self.answers[name] = lambda n: first if n == 1 else then


def _addrinfo(address: str, port: Any) -> tuple[Any, ...]:
    port_number = int(port or 0)
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port_number, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port_number))


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    """Replace name resolution: fake names answer from the table, IP literals pass, anything else fails."""
    real_getaddrinfo = socket.getaddrinfo
    fake = FakeDNS()

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in fake.answers:
            fake.calls[name] += 1
            return [_addrinfo(a, port) for a in fake.answers[name](fake.calls[name])]
        # AI_NUMERICHOST: literals only, so the real resolver is never asked about a name.
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    fake.add("localhost", "127.0.0.1")
    return fake


# --- a tiny loopback HTTP server ------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    host: str | None
    authorization: str | None
    client_port: int
    accept_encoding: str | None = None


class LocalServer:
    """Records every request it receives; routes: /redirect, /same-origin, /sse, anything else 200."""

    def __init__(self, bind: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        self.sse_second_event_released = threading.Event()
        self.sse_waited_for_client = False
        # /endless: bytes written before the client hung up (set when the handler is done).
        self.endless_written = 0
        self.endless_done = threading.Event()
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse is observable

            def do_GET(self) -> None:
                state.seen.append(
                    Seen(
                        self.path,
                        self.headers.get("Host"),
                        self.headers.get("Authorization"),
                        self.client_address[1],
                        self.headers.get("Accept-Encoding"),
                    )
                )
                if self.path == "/endless":
                    self._endless()
                elif self.path == "/declared-huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 40))
                    self.end_headers()
                    self.wfile.write(b"x" * 1024)
                    self.close_connection = True
                elif self.path == "/gzip":
                    body = gzip.compress(b"x" * (1 << 20))  # 1 MiB inflated from about 1 KiB
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/redirect":
                    self._reply(302, b"", location="/target")
                elif self.path == "/same-origin":
                    self._reply(307, b"", location="/target")
                elif self.path == "/sse":
                    self._sse()
                else:
                    self._reply(200, b"ok")

            def _reply(self, status: int, body: bytes, location: str | None = None) -> None:
                self.send_response(status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _endless(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    # A safety stop far above any cap, so a client that never stops cannot hang the run.
                    while state.endless_written < (512 << 20):
                        self.wfile.write(chunk)
                        state.endless_written += len(chunk)
                except OSError:
                    pass  # the client hung up
                finally:
                    self.close_connection = True
                    state.endless_done.set()

            def _sse(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"data: first\n\n")
                self.wfile.flush()
                # The second event only goes out once the client has read the first: a transport
                # that buffered the whole body would never get here before the timeout.
                state.sse_waited_for_client = state.sse_second_event_released.wait(timeout=5)
                self.wfile.write(b"data: second\n\n")
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        family = socket.AF_INET6 if ":" in bind else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((bind, 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    yield srv
    srv.close()


def _leaf(exc: BaseException) -> BaseException:
    """The first leaf of a (possibly nested) exception group, the way the MCP SDK wraps errors."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# --- host_matches ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "patterns", "expected"),
    [
        ("api.example.com", ["api.example.com"], True),
        ("api.example.com", ["example.com"], False),  # exact means exact
        ("example.com", ["api.example.com"], False),
        ("api.example.com", ["*.example.com"], True),
        ("a.b.c.example.com", ["*.example.com"], True),  # any depth
        ("example.com", ["*.example.com"], False),  # the bare suffix is not its own subdomain
        ("badexample.com", ["*.example.com"], False),  # suffix must start at a label boundary
        ("example.com.evil.net", ["*.example.com", "example.com"], False),
        ("API.Example.COM", ["api.example.com"], True),
        ("api.example.com", ["*.EXAMPLE.com"], True),
        ("api.example.com.", ["api.example.com"], True),  # trailing dot ignored on the host
        ("api.example.com", ["api.example.com."], True),  # ... and on the pattern
        ("x.example.com.", ["*.example.com."], True),
        ("api.example.com", [], False),
        ("", ["*.example.com", ""], False),
        ("anything.com", ["*.", "*"], False),  # degenerate wildcards allow nothing
        ("10.0.0.1", ["10.0.0.1"], True),
        ("::1", ["[::1]"], True),
    ],
)
def test_host_matches(host: str, patterns: list[str], expected: bool) -> None:
    assert host_matches(host, patterns) is expected


@pytest.mark.parametrize(
    ("host", "patterns", "port", "scheme", "expected"),
    [
        ("api.example.com", ["api.example.com"], None, "https", True),  # no port: the default
        ("api.example.com", ["api.example.com"], 443, "https", True),
        ("api.example.com", ["api.example.com"], 8443, "https", False),  # a bare host: default port only
        ("api.example.com", ["api.example.com"], 80, "http", True),
        ("api.example.com", ["api.example.com"], 443, "http", False),  # 443 is not http's default
        ("api.example.com", ["api.example.com:8443"], 8443, "https", True),
        ("api.example.com", ["api.example.com:8443"], None, "https", False),  # pinned: only that port
        ("api.example.com", ["api.example.com:8443"], 9443, "https", False),
        ("api.example.com", ["api.example.com:443"], None, "https", True),
        ("eu.api.example.com", ["*.example.com:8443"], 8443, "https", True),  # wildcards pin too
        ("eu.api.example.com", ["*.example.com:8443"], 443, "https", False),
        ("eu.api.example.com", ["*.example.com"], 8443, "https", False),
        ("::1", ["[::1]:8443"], 8443, "https", True),
        ("::1", ["[::1]:8443"], 443, "https", False),
        ("::1", ["[::1]"], 8443, "https", False),
        ("::1", ["::1"], None, "https", True),  # an unbracketed IPv6 literal has no port
        ("10.0.0.1", ["10.0.0.1:8080"], 8080, "http", True),
        ("api.example.com", ["api.example.com:0", "api.example.com:99999", "[::1"], 443, "https", False),
    ],
)
def test_host_matches_with_ports(host: str, patterns: list[str], port: int | None, scheme: str, expected: bool) -> None:
    assert host_matches(host, patterns, port=port, scheme=scheme) is expected


def test_host_matches_rejects_a_bare_string_instead_of_a_list() -> None:
    with pytest.raises(TypeError):
        host_matches("e.com", "e.com")


# --- policy ---------------------------------------------------------------------------------------


def test_policy_from_settings_normalises_http_hosts() -> None:
    settings = Settings(egress_allow_private=True, egress_allow_http_hosts="LocalHost., 127.0.0.1, [::1]")
    policy = EgressPolicy.from_settings(settings)
    assert policy == EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"localhost", "127.0.0.1", "::1"}))


def test_policy_defaults_are_strict() -> None:
    assert EgressPolicy.from_settings(Settings()) == EgressPolicy(allow_private=False, allow_http_hosts=frozenset())


# --- schemes and URL shape ------------------------------------------------------------------------


def test_https_to_a_public_host_returns_every_checked_address(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4, PUBLIC_V6, PUBLIC_V4)
    assert check_destination("https://api.example.com/v1?x=1", EgressPolicy()) == Destination(
        scheme="https", host="api.example.com", port=443, addresses=(PUBLIC_V4, PUBLIC_V6)
    )


def test_explicit_port_is_kept(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    assert check_destination("https://api.example.com:8443/", EgressPolicy()).port == 8443


@pytest.mark.parametrize("url", ["http://api.example.com/", "http://API.example.com./", "HTTP://api.example.com/"])
def test_plain_http_is_refused_by_default(dns: FakeDNS, url: str) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    with pytest.raises(EgressDeniedError, match="plain http"):
        check_destination(url, EgressPolicy())


def test_plain_http_is_allowed_only_for_listed_hosts(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    dns.add("other.example.com", PUBLIC_V4)
    policy = EgressPolicy(allow_http_hosts=frozenset({"API.example.com"}))
    assert check_destination("http://api.example.com/", policy).port == 80
    with pytest.raises(EgressDeniedError, match="plain http"):
        check_destination("http://other.example.com/", policy)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://api.example.com/f",
        "file:///etc/passwd",
        "data:text/plain,hello",
        "ws://api.example.com/",
        "wss://api.example.com/",
        "gopher://api.example.com/",
    ],
)
def test_other_schemes_are_refused(dns: FakeDNS, url: str) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    with pytest.raises(EgressDeniedError):
        check_destination(url, EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"api.example.com"})))


@pytest.mark.parametrize("url", ["https://user:pw@api.example.com/", "https://user@api.example.com/"])
def test_userinfo_in_the_url_is_refused(dns: FakeDNS, url: str) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    with pytest.raises(EgressDeniedError, match="credentials"):
        check_destination(url, EgressPolicy())


@pytest.mark.parametrize(
    "query",
    [
        "access_token=abc",
        "ACCESS_TOKEN=abc",
        "x=1&token=abc",
        "Api-Key=abc",
        "apikey=abc",
        "key=abc",
        "secret=abc",
        "password=abc",
        "auth=abc",
        "sig=abc",
        "X-Amz-Signature=abc",
        "github_token=abc",
        "client_secret=abc",
        "%61ccess_token=abc",  # percent-encoded name: a server decodes it to access_token
        "token",  # a bare name still names a credential
    ],
)
def test_a_credential_in_the_query_is_refused_before_any_lookup(dns: FakeDNS, query: str) -> None:
    dns.add("mcp.example.com", PUBLIC_V4)
    with pytest.raises(EgressDeniedError) as info:
        check_destination(f"https://mcp.example.com/mcp?{query}", EgressPolicy())
    assert "abc" not in info.value.message and "?" not in info.value.message
    assert dns.calls["mcp.example.com"] == 0


def test_a_query_without_credentials_passes(dns: FakeDNS) -> None:
    # e.g. the SSE transport's message endpoint (?session_id=...)
    dns.add("mcp.example.com", PUBLIC_V4)
    url = "https://mcp.example.com/messages/?session_id=0f1e&cursor=2&q=monkey&keyboard=1&tokens=3"
    assert check_destination(url, EgressPolicy()).host == "mcp.example.com"


@pytest.mark.parametrize("url", ["https:///path", "https://", "https:/path", "/relative/only"])
def test_a_url_without_host_is_refused(url: str) -> None:
    with pytest.raises(EgressDeniedError):
        check_destination(url, EgressPolicy(allow_private=True))


def test_an_unparseable_url_is_refused() -> None:
    with pytest.raises(EgressDeniedError, match="not valid"):
        check_destination("https://[::1/", EgressPolicy(allow_private=True))


def test_an_unresolvable_host_fails_with_its_own_code() -> None:
    with pytest.raises(EgressResolutionError) as info:
        check_destination("https://no-such-name.invalid/", EgressPolicy())
    assert info.value.code == "egress_unresolvable"


# --- address classes ------------------------------------------------------------------------------

NON_PUBLIC = [
    "127.0.0.1",
    "127.1.2.3",
    "::1",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.10.10",
    "100.64.0.1",
    "100.127.255.254",
    "0.0.0.0",  # noqa: S104 - the address under test, not a bind
    "::",
    "fc00::1",
    "fd12:3456::1",
    "fe80::1",
    "fec0::1",  # site-local
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "2002:7f00:1::1",  # 6to4 wrapping 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
]
METADATA = [
    "169.254.169.254",
    "fd00:ec2::254",
    "100.100.100.200",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_literal_addresses_are_refused_by_default(address: str) -> None:
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(EgressDeniedError, match="non-public"):
        check_destination(f"https://{host}/", EgressPolicy())


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_behind_a_name_are_refused_by_default(dns: FakeDNS, address: str) -> None:
    dns.add("internal.example.com", address)
    with pytest.raises(EgressDeniedError, match="non-public"):
        check_destination("https://internal.example.com/", EgressPolicy())


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_allowed_when_the_operator_allows_private(dns: FakeDNS, address: str) -> None:
    dns.add("internal.example.com", address)
    destination = check_destination("https://internal.example.com/", EgressPolicy(allow_private=True))
    assert destination.addresses == (str(ipaddress.ip_address(address)),)


@pytest.mark.parametrize("address", [PUBLIC_V4, PUBLIC_V6, "::ffff:93.184.215.14", "64:ff9b::5db8:d70e"])
def test_public_addresses_pass_including_mapped_and_nat64_forms(dns: FakeDNS, address: str) -> None:
    dns.add("api.example.com", address)
    assert check_destination("https://api.example.com/", EgressPolicy()).addresses == (
        str(ipaddress.ip_address(address)),
    )


@pytest.mark.parametrize("private", ["10.0.0.7", "127.0.0.1", "fd00::7"])
def test_a_name_with_one_public_and_one_private_address_is_refused(dns: FakeDNS, private: str) -> None:
    dns.add("mixed.example.com", PUBLIC_V4, private)
    with pytest.raises(EgressDeniedError, match="non-public"):
        check_destination("https://mixed.example.com/", EgressPolicy())
    dns.add("mixed-reversed.example.com", private, PUBLIC_V4)
    with pytest.raises(EgressDeniedError, match="non-public"):
        check_destination("https://mixed-reversed.example.com/", EgressPolicy())
    # The operator relaxation lets the same answer through.
    assert check_destination("https://mixed.example.com/", EgressPolicy(allow_private=True)).addresses == (
        PUBLIC_V4,
        private,
    )


@pytest.mark.parametrize("address", METADATA)
@pytest.mark.parametrize("allow_private", [False, True])
def test_cloud_metadata_addresses_are_always_refused(dns: FakeDNS, address: str, allow_private: bool) -> None:
    dns.add("metadata.google.internal", PUBLIC_V4, address)
    policy = EgressPolicy(allow_private=allow_private, allow_http_hosts=frozenset({"metadata.google.internal"}))
    with pytest.raises(EgressDeniedError, match="metadata"):
        check_destination("http://metadata.google.internal/computeMetadata/v1/", policy)
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(EgressDeniedError, match="metadata"):
        check_destination(f"https://{host}/latest/meta-data/", policy)


# --- the secret's allowed_hosts -------------------------------------------------------------------


def test_allowed_hosts_mismatch_is_refused_before_any_lookup(dns: FakeDNS) -> None:
    dns.add("evil.example.net", PUBLIC_V4)
    with pytest.raises(DestinationDeniedError) as info:
        check_destination("https://evil.example.net/", EgressPolicy(), ["api.example.com", "*.example.com"])
    assert info.value.code == "secret_destination_denied"
    assert info.value.host == "evil.example.net"
    assert dns.calls["evil.example.net"] == 0


def test_allowed_hosts_match_passes(dns: FakeDNS) -> None:
    dns.add("eu.api.example.com", PUBLIC_V4)
    destination = check_destination("https://eu.api.example.com/", EgressPolicy(), ["*.example.com"])
    assert destination.addresses == (PUBLIC_V4,)


def test_allowed_hosts_do_not_relax_the_address_policy(dns: FakeDNS) -> None:
    dns.add("api.example.com", "10.0.0.5")
    with pytest.raises(EgressDeniedError):
        check_destination("https://api.example.com/", EgressPolicy(), ["api.example.com"])


def test_allowed_hosts_pin_ports_before_any_lookup(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    with pytest.raises(DestinationDeniedError) as info:
        check_destination("https://api.example.com:8443/", EgressPolicy(), ["api.example.com"])
    assert "port 8443" in info.value.message
    with pytest.raises(DestinationDeniedError):
        check_destination("https://api.example.com/", EgressPolicy(), ["api.example.com:8443"])
    with pytest.raises(DestinationDeniedError):
        check_destination("https://api.example.com:444/", EgressPolicy(), ["api.example.com:8443"])
    assert dns.calls["api.example.com"] == 0
    assert check_destination("https://api.example.com:8443/", EgressPolicy(), ["api.example.com:8443"]).port == 8443
    assert check_destination("https://api.example.com:443/", EgressPolicy(), ["api.example.com"]).port == 443


@pytest.mark.parametrize("allowed", [None, []])
def test_no_allowed_hosts_means_no_host_restriction(dns: FakeDNS, allowed: list[str] | None) -> None:
    dns.add("anywhere.example.org", PUBLIC_V4)
    assert check_destination("https://anywhere.example.org/", EgressPolicy(), allowed).host == "anywhere.example.org"


# --- several secrets on one request (header credentials): every allowed_hosts must match ---------


def test_every_secrets_allowed_hosts_must_match_before_any_lookup(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    rules = [["api.example.com"], ["*.example.org"]]
    with pytest.raises(DestinationDeniedError) as info:
        check_destination("https://api.example.com/", EgressPolicy(), host_rules=rules)
    assert info.value.code == "secret_destination_denied" and info.value.host == "api.example.com"
    assert "1 of the 2 secrets" in info.value.message
    assert dns.calls["api.example.com"] == 0
    # The single allowed_hosts of existing callers counts as one more rule.
    with pytest.raises(DestinationDeniedError):
        check_destination(
            "https://api.example.com/", EgressPolicy(), ["*.example.org"], host_rules=[["api.example.com"]]
        )
    assert dns.calls["api.example.com"] == 0


def test_a_host_every_rule_allows_passes_and_empty_rules_restrict_nothing(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    rules = [["api.example.com"], ["*.example.com"], []]
    assert check_destination("https://api.example.com/", EgressPolicy(), host_rules=rules).addresses == (PUBLIC_V4,)
    assert check_destination("https://api.example.com/", EgressPolicy(), host_rules=[[], []]).host == "api.example.com"


def test_host_rules_must_be_lists_of_patterns() -> None:
    with pytest.raises(TypeError):
        check_destination("https://api.example.com/", EgressPolicy(), host_rules=["api.example.com"])


def test_a_guarded_client_with_host_rules_sends_nothing_outside_any_of_them(dns: FakeDNS) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    with (
        guarded_client(EgressPolicy(), host_rules=[["api.example.com"], ["other.example.com"]]) as client,
        pytest.raises(DestinationDeniedError),
    ):
        client.get("https://api.example.com/", headers={"X-API-Key": TOKEN})
    assert dns.calls["api.example.com"] == 0


# --- error shape ----------------------------------------------------------------------------------

TOKEN = "tok-SEKRIT-123"


@pytest.mark.parametrize(
    ("url", "allowed", "error"),
    [
        (f"https://10.0.0.1/x?q={TOKEN}", None, EgressDeniedError),
        (f"http://api.example.com/x?q={TOKEN}", None, EgressDeniedError),
        (f"ftp://api.example.com/x?q={TOKEN}", None, EgressDeniedError),
        (f"https://user:{TOKEN}@api.example.com/x", None, EgressDeniedError),
        (f"https://api.example.com/x?access_token={TOKEN}", None, EgressDeniedError),
        (f"https://evil.example.net/x?q={TOKEN}", ["api.example.com"], DestinationDeniedError),
        (f"https://api.example.com:8443/x?q={TOKEN}", ["api.example.com"], DestinationDeniedError),
        (f"https://no-such.invalid/x?q={TOKEN}", None, EgressResolutionError),
        (f"https://[::1/x?token={TOKEN}", None, EgressDeniedError),
        (f"https://169.254.169.254/x?q={TOKEN}#{TOKEN}", None, EgressDeniedError),
    ],
)
def test_errors_carry_a_code_and_never_the_query_or_credentials(
    dns: FakeDNS, url: str, allowed: list[str] | None, error: type[EgressError]
) -> None:
    dns.add("api.example.com", PUBLIC_V4)
    dns.add("evil.example.net", PUBLIC_V4)
    with pytest.raises(error) as info:
        check_destination(url, EgressPolicy(), allowed)
    exc = info.value
    assert exc.code == error.code and exc.code in {"egress_denied", "secret_destination_denied", "egress_unresolvable"}
    rendered = "".join(traceback.format_exception(exc)) + repr(exc) + exc.message
    assert TOKEN not in rendered
    assert "?" not in exc.message


def test_error_codes_are_stable() -> None:
    assert EgressDeniedError.code == "egress_denied"
    assert DestinationDeniedError.code == "secret_destination_denied"
    assert issubclass(EgressDeniedError, EgressError) and issubclass(DestinationDeniedError, EgressError)


# --- real traffic on loopback ---------------------------------------------------------------------


def test_sync_client_reaches_a_loopback_server_when_private_is_allowed(server: LocalServer) -> None:
    with guarded_client(LOCAL, headers={"Authorization": "Bearer t"}) as client:
        for host in ("127.0.0.1", "localhost"):
            response = client.get(f"http://{host}:{server.port}/hello")
            assert (response.status_code, response.text) == (200, "ok")
            # The caller still sees the URL it asked for, not the pinned IP.
            assert str(response.url) == f"http://{host}:{server.port}/hello"
    assert [(s.path, s.host, s.authorization) for s in server.seen] == [
        ("/hello", f"127.0.0.1:{server.port}", "Bearer t"),
        ("/hello", f"localhost:{server.port}", "Bearer t"),
    ]


def test_async_client_reaches_a_loopback_server_when_private_is_allowed(server: LocalServer) -> None:
    async def run() -> httpx2.Response:
        async with guarded_async_client(LOCAL, headers={"Authorization": "Bearer t"}) as client:
            return await client.get(f"http://localhost:{server.port}/hello")

    response = asyncio.run(run())
    assert (response.status_code, response.text) == (200, "ok")
    assert [(s.path, s.host, s.authorization) for s in server.seen] == [
        ("/hello", f"localhost:{server.port}", "Bearer t")
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_sync_client_refuses_loopback_when_private_is_not_allowed(server: LocalServer, host: str) -> None:
    with guarded_client(STRICT_HTTP) as client, pytest.raises(EgressDeniedError):
        client.get(f"http://{host}:{server.port}/hello")
    assert server.seen == []


def test_async_client_refuses_loopback_when_private_is_not_allowed(server: LocalServer) -> None:
    async def run() -> None:
        async with guarded_async_client(STRICT_HTTP) as client:
            await client.get(f"http://127.0.0.1:{server.port}/hello")

    with pytest.raises(EgressDeniedError):
        asyncio.run(run())
    assert server.seen == []


def test_every_request_is_checked_not_just_the_first(server: LocalServer) -> None:
    # A later URL (e.g. one a tool call hands back) gets the same allowed_hosts check.
    with guarded_client(LOCAL, allowed_hosts=[f"127.0.0.1:{server.port}"]) as client:
        assert client.get(f"http://127.0.0.1:{server.port}/first").status_code == 200
        with pytest.raises(DestinationDeniedError):
            client.get(f"http://localhost:{server.port}/second")
        with pytest.raises(DestinationDeniedError):  # the right host on another port
            client.get(f"http://127.0.0.1:{server.port + 1}/second")
        with pytest.raises(EgressDeniedError):
            client.get(f"ftp://127.0.0.1:{server.port}/third")
    assert server.paths() == ["/first"]


def test_ipv6_loopback_is_reached_through_a_bracketed_pinned_address(dns: FakeDNS) -> None:
    try:
        srv = LocalServer(bind="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        dns.add("v6.test", "::1")
        policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"v6.test", "::1"}))
        with guarded_client(policy) as client:
            assert client.get(f"http://v6.test:{srv.port}/a").status_code == 200
            assert client.get(f"http://[::1]:{srv.port}/b").status_code == 200
        assert [(s.path, s.host) for s in srv.seen] == [("/a", f"v6.test:{srv.port}"), ("/b", f"[::1]:{srv.port}")]
    finally:
        srv.close()


def test_an_address_that_refuses_falls_back_to_the_next_checked_address(server: LocalServer, dns: FakeDNS) -> None:
    # Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1 only).
    dns.add("multi.test", "127.0.0.2", "127.0.0.1")
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"multi.test"}))
    with guarded_client(policy) as client:
        assert client.get(f"http://multi.test:{server.port}/x").status_code == 200
    assert dns.calls["multi.test"] == 1
    assert [(s.path, s.host) for s in server.seen] == [("/x", f"multi.test:{server.port}")]


def test_two_names_on_one_address_never_share_a_connection(server: LocalServer, dns: FakeDNS) -> None:
    dns.add("a.test", "127.0.0.1")
    dns.add("b.test", "127.0.0.1")
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"a.test", "b.test"}))
    with guarded_client(policy) as client:
        for path in ("/a1", "/a2", "/b1"):
            client.get(f"http://{path[1]}.test:{server.port}{path}")
    ports = {s.path: s.client_port for s in server.seen}
    assert ports["/a1"] == ports["/a2"]  # keep-alive still works within one name
    assert ports["/b1"] != ports["/a1"]  # but a connection made for a.test never carries b.test


# --- redirects ------------------------------------------------------------------------------------


def test_sync_client_returns_a_redirect_without_following_it(server: LocalServer) -> None:
    with guarded_client(LOCAL) as client:
        response = client.get(f"http://127.0.0.1:{server.port}/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "/target"
    assert server.paths() == ["/redirect"]


def test_async_client_returns_a_redirect_without_following_it(server: LocalServer) -> None:
    async def run() -> httpx2.Response:
        async with guarded_async_client(LOCAL) as client:
            return await client.get(f"http://127.0.0.1:{server.port}/redirect")

    assert asyncio.run(run()).status_code == 302
    assert server.paths() == ["/redirect"]


def test_asking_to_follow_redirects_per_request_still_does_not_follow(server: LocalServer) -> None:
    with guarded_client(LOCAL) as client, pytest.raises(httpx2.TooManyRedirects):
        client.get(f"http://127.0.0.1:{server.port}/redirect", follow_redirects=True)
    assert server.paths() == ["/redirect"]


def test_the_mcp_sdk_same_origin_redirect_following_is_disabled(server: LocalServer) -> None:
    # The MCP SDK follows same-origin redirects itself (up to client.max_redirects), ignoring
    # follow_redirects; the control client shows it would, the guarded client must not.
    from mcp.shared._httpx_utils import request_within_origin

    url = f"http://127.0.0.1:{server.port}/same-origin"

    async def run(client: httpx2.AsyncClient) -> int:
        async with client:
            return (await request_within_origin(client, "GET", url)).status_code

    assert asyncio.run(run(httpx2.AsyncClient())) == 200
    assert server.paths() == ["/same-origin", "/target"]
    server.seen.clear()
    assert asyncio.run(run(guarded_async_client(LOCAL))) == 307
    assert server.paths() == ["/same-origin"]


# --- streaming ------------------------------------------------------------------------------------


def test_async_client_streams_server_sent_events_incrementally(server: LocalServer) -> None:
    async def run() -> list[str]:
        lines: list[str] = []
        async with (
            guarded_async_client(LOCAL) as client,
            client.stream("GET", f"http://127.0.0.1:{server.port}/sse") as response,
        ):
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if line == "data: first":
                    server.sse_second_event_released.set()
        return lines

    assert asyncio.run(run()) == ["data: first", "data: second"]
    assert server.sse_waited_for_client  # the first event arrived while the response was still open


# --- response size cap ----------------------------------------------------------------------------

CAP = 256 * 1024
CAPPED = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"127.0.0.1"}), max_response_bytes=CAP)


def _assert_the_read_stopped(server: LocalServer, peak: int) -> None:
    # The client held about one cap's worth of the body, never the stream ...
    assert peak < 8 * CAP, peak
    # ... and hung up: the server wrote little more than the socket buffers hold, not the 512 MiB it had.
    assert server.endless_done.wait(10)
    assert server.endless_written < 64 << 20, server.endless_written


def test_sync_client_stops_reading_an_endless_body_at_the_cap(server: LocalServer) -> None:
    tracemalloc.start()
    try:
        with guarded_client(CAPPED) as client, pytest.raises(ResponseTooLargeError) as info:
            client.get(f"http://127.0.0.1:{server.port}/endless")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.code, info.value.limit, info.value.host) == ("response_too_large", CAP, "127.0.0.1")
    _assert_the_read_stopped(server, peak)


def test_async_client_stops_reading_an_endless_stream_at_the_cap(server: LocalServer) -> None:
    async def run() -> int:
        got = 0
        async with (
            guarded_async_client(CAPPED) as client,
            client.stream("GET", f"http://127.0.0.1:{server.port}/endless") as response,
        ):
            async for chunk in response.aiter_bytes():
                got += len(chunk)
        return got

    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLargeError):
            asyncio.run(run())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _assert_the_read_stopped(server, peak)


def test_a_declared_length_over_the_cap_is_refused_before_reading(server: LocalServer) -> None:
    with guarded_client(CAPPED) as client, pytest.raises(ResponseTooLargeError):
        client.get(f"http://127.0.0.1:{server.port}/declared-huge")


def test_guarded_clients_ask_for_identity_and_refuse_a_compressed_body(server: LocalServer) -> None:
    # A compressed body could inflate far past the cap after its bytes were counted.
    with guarded_client(CAPPED) as client:
        assert client.get(f"http://127.0.0.1:{server.port}/plain").text == "ok"
        with pytest.raises(ResponseTooLargeError, match="compressed"):
            client.get(f"http://127.0.0.1:{server.port}/gzip")
    assert [s.accept_encoding for s in server.seen] == ["identity", "identity"]


def test_the_cap_comes_from_settings() -> None:
    assert EgressPolicy().max_response_bytes == 4 * 1024 * 1024
    assert EgressPolicy.from_settings(Settings(max_response_bytes=65536)).max_response_bytes == 65536


# --- DNS rebinding --------------------------------------------------------------------------------


def test_sync_client_connects_to_the_address_it_checked_not_a_fresh_lookup(server: LocalServer, dns: FakeDNS) -> None:
    # rebind.test answers 127.0.0.1 once, then 127.0.0.2 (where nothing listens). Re-resolving at
    # connect time would make a second lookup and fail to connect.
    dns.add_sequence("rebind.test", ["127.0.0.1"], ["127.0.0.2"])
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"rebind.test"}))
    with guarded_client(policy) as client:
        assert client.get(f"http://rebind.test:{server.port}/one").status_code == 200
        assert dns.calls["rebind.test"] == 1
        assert [(s.path, s.host) for s in server.seen] == [("/one", f"rebind.test:{server.port}")]
        # The next request is checked afresh and goes where that check pointed: never to the old
        # answer, never to a third lookup.
        with pytest.raises(httpx2.ConnectError):
            client.get(f"http://rebind.test:{server.port}/two")
        assert dns.calls["rebind.test"] == 2
    assert server.paths() == ["/one"]


def test_async_client_connects_to_the_address_it_checked_not_a_fresh_lookup(server: LocalServer, dns: FakeDNS) -> None:
    dns.add_sequence("rebind.test", ["127.0.0.1"], ["127.0.0.2"])
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"rebind.test"}))

    async def run() -> int:
        async with guarded_async_client(policy) as client:
            return (await client.get(f"http://rebind.test:{server.port}/one")).status_code

    assert asyncio.run(run()) == 200
    assert dns.calls["rebind.test"] == 1
    assert [(s.path, s.host) for s in server.seen] == [("/one", f"rebind.test:{server.port}")]


@dataclass
class Sent:
    url: str
    host_header: str | None
    sni_hostname: Any


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """Stand in for the inner httpx2 transports: record what would go on the wire, connect nowhere."""
    sent: list[Sent] = []

    def record(request: httpx2.Request) -> httpx2.Response:
        sent.append(Sent(str(request.url), request.headers.get("host"), request.extensions.get("sni_hostname")))
        return httpx2.Response(204)

    async def arecord(_self: Any, request: httpx2.Request) -> httpx2.Response:
        return record(request)

    monkeypatch.setattr(httpx2.HTTPTransport, "handle_request", lambda _self, request: record(request))
    monkeypatch.setattr(httpx2.AsyncHTTPTransport, "handle_async_request", arecord)
    return sent


def test_a_name_rebinding_to_private_after_a_public_check_is_sent_to_the_public_address(
    dns: FakeDNS, captured: list[Sent]
) -> None:
    dns.add_sequence("rebind.example.com", [PUBLIC_V4], ["127.0.0.1"])
    with guarded_client(EgressPolicy()) as client:
        assert client.get("https://rebind.example.com/v1/chat?k=1").status_code == 204
        assert captured == [Sent(f"https://{PUBLIC_V4}/v1/chat?k=1", "rebind.example.com", "rebind.example.com")]
        assert dns.calls["rebind.example.com"] == 1
        # The second request sees the rebound (private) answer and is refused before anything is sent.
        with pytest.raises(EgressDeniedError):
            client.get("https://rebind.example.com/v1/chat")
    assert len(captured) == 1


def test_async_pinning_keeps_host_header_and_sets_sni_to_the_real_name(dns: FakeDNS, captured: list[Sent]) -> None:
    dns.add("api.example.com", PUBLIC_V6)

    async def run() -> None:
        async with guarded_async_client(EgressPolicy()) as client:
            await client.post("https://api.example.com:8443/mcp", json={"a": 1})

    asyncio.run(run())
    assert captured == [Sent(f"https://[{PUBLIC_V6}]:8443/mcp", "api.example.com:8443", "api.example.com")]


def test_an_ip_literal_url_gets_no_sni_override(captured: list[Sent]) -> None:
    with guarded_client(EgressPolicy()) as client:
        client.get(f"https://{PUBLIC_V4}/x")
    assert captured == [Sent(f"https://{PUBLIC_V4}/x", PUBLIC_V4, None)]


# --- TLS: SNI and certificate verification use the real name ---------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for sni.test only (no IP SAN), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=sni.test"),
            *("-addext", "subjectAltName=DNS:sni.test"),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


def test_tls_uses_the_real_name_for_sni_and_certificate_checks(dns: FakeDNS, tls_cert: tuple[Path, Path]) -> None:
    key, cert = tls_cert
    names: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    srv = LocalServer(tls=server_ctx)
    try:
        dns.add("sni.test", "127.0.0.1")
        dns.add("other.test", "127.0.0.1")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        policy = EgressPolicy(allow_private=True)
        with guarded_client(policy, ssl_context=client_ctx) as client:
            # The socket goes to 127.0.0.1, which the certificate does not name: this only passes
            # if verification (and SNI) use sni.test.
            assert client.get(f"https://sni.test:{srv.port}/secure").status_code == 200
            assert names == ["sni.test"]
            assert [(s.path, s.host) for s in srv.seen] == [("/secure", f"sni.test:{srv.port}")]
            # Verification is really on: a name the certificate does not cover fails the handshake.
            with pytest.raises(httpx2.ConnectError, match="certificate verify failed"):
                client.get(f"https://other.test:{srv.port}/secure")
        assert srv.paths() == ["/secure"]
    finally:
        srv.close()


# --- MCP SDK callers --------------------------------------------------------------------------------


@pytest.fixture
def mcp_server() -> Iterator[int]:
    """A real MCP Streamable HTTP server (one ``add`` tool) on a free loopback port."""
    import uvicorn
    from mcp.server.mcpserver import MCPServer
    from mcp.server.transport_security import TransportSecuritySettings

    mcp = MCPServer("egress-test")

    @mcp.tool()
    def add(a: int, b: int) -> int:
        return a + b

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    # The SDK's own DNS-rebinding guard only accepts Host: mcp.test:<port>, so the session below
    # also proves the pinned requests still carry the real host name.
    security = TransportSecuritySettings(allowed_hosts=["mcp.test:*"])
    app = mcp.streamable_http_app(host="127.0.0.1", transport_security=security)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if uv.started:
            break
        time.sleep(0.01)
    yield port
    uv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def test_an_mcp_session_works_end_to_end_through_the_guard(mcp_server: int, dns: FakeDNS) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    dns.add("mcp.test", "127.0.0.1")
    policy = EgressPolicy(allow_private=True, allow_http_hosts=frozenset({"mcp.test"}))

    async def run() -> tuple[list[str], Any]:
        async with (
            guarded_async_client(policy, [f"mcp.test:{mcp_server}"]) as http,
            Client(streamable_http_client(f"http://mcp.test:{mcp_server}/mcp", http_client=http)) as client,
        ):
            tools = [t.name for t in (await client.list_tools()).tools]
            return tools, (await client.call_tool("add", {"a": 2, "b": 3})).structured_content

    assert asyncio.run(run()) == (["add"], {"result": 5})
    # Every request the SDK sent (discovery, list, call, session close) was checked on its own.
    assert dns.calls["mcp.test"] >= 3


def test_mcp_sdk_callers_find_the_denial_as_the_exception_group_leaf(server: LocalServer) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> None:
        async with (
            guarded_async_client(STRICT_HTTP) as http,
            Client(streamable_http_client(f"http://127.0.0.1:{server.port}/mcp", http_client=http)),
        ):
            pass

    with pytest.raises(BaseException) as info:  # noqa: PT011 - the point is what the leaf is
        asyncio.run(run())
    leaf = _leaf(info.value)
    assert isinstance(leaf, EgressDeniedError) and leaf.code == "egress_denied"
    assert server.seen == []
