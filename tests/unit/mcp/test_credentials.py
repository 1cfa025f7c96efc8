"""app.mcp.credentials: a server's auth config turned into headers, host rules, reads and values."""

from __future__ import annotations

import pytest

from app.mcp.credentials import (
    HeaderSpec,
    InvalidHeaderValueError,
    ServerCredentials,
    bearer_headers,
    static_credentials,
)
from app.secrets.resolver import Resolved

SECRETS = {
    "s-key": Resolved("s-key", 3, "key-VALUE-1", ("mcp.example.com",)),
    "s-tok": Resolved("s-tok", 1, "tok-VALUE-2", ("*.example.com",)),
    "s-open": Resolved("s-open", 2, "open-VALUE-3", ()),
}


class Resolver:
    def __init__(self, secrets: dict[str, Resolved] | None = None) -> None:
        self.secrets = secrets or SECRETS
        self.calls: list[str] = []

    def __call__(self, ref: str) -> Resolved:
        self.calls.append(ref)
        return self.secrets[ref]


def test_nothing_configured_sends_nothing() -> None:
    resolve = Resolver()
    assert static_credentials(resolve, None, []) == ServerCredentials()
    assert resolve.calls == []


def test_secret_ref_is_the_bearer_shorthand() -> None:
    creds = static_credentials(Resolver(), "s-key", [])
    assert creds.headers == {"Authorization": "Bearer key-VALUE-1"} == bearer_headers("key-VALUE-1")
    assert creds.host_rules == (("mcp.example.com",),)
    assert creds.reads == ({"secret_id": "s-key", "version": 3},)
    assert creds.values == ("key-VALUE-1",)


def test_templates_are_substituted_and_each_secret_resolved_once() -> None:
    resolve = Resolver()
    specs = [
        HeaderSpec("X-API-Key", "{{secret}}", "s-key"),
        HeaderSpec("Authorization", "token {{secret}}", "s-tok"),
        HeaderSpec("X-Again", "k={{secret}};", "s-key"),
    ]
    creds = static_credentials(resolve, None, specs)
    assert creds.headers == {
        "X-API-Key": "key-VALUE-1",
        "Authorization": "token tok-VALUE-2",
        "X-Again": "k=key-VALUE-1;",
    }
    assert resolve.calls == ["s-key", "s-tok"]
    # One host rule per secret used: the guard requires every one of them.
    assert creds.host_rules == (("mcp.example.com",), ("*.example.com",))
    assert [r["secret_id"] for r in creds.reads] == ["s-key", "s-tok"]
    assert set(creds.values) == {"key-VALUE-1", "tok-VALUE-2"}


def test_a_secret_without_allowed_hosts_adds_an_empty_rule() -> None:
    creds = static_credentials(Resolver(), "s-open", [HeaderSpec("X-K", "{{secret}}", "s-key")])
    assert creds.host_rules == ((), ("mcp.example.com",))


@pytest.mark.parametrize("bad", ["a\r\nX-Evil: 1", "line\n", "nul\x00", "bell\x07", "ünïcode"])
@pytest.mark.parametrize("as_bearer", [True, False])
def test_a_value_that_cannot_be_a_header_is_refused_without_quoting_it(bad: str, as_bearer: bool) -> None:
    resolve = Resolver({"s-bad": Resolved("s-bad", 1, bad, ())})
    bearer, headers = ("s-bad", []) if as_bearer else (None, [HeaderSpec("X-K", "v {{secret}}", "s-bad")])
    with pytest.raises(InvalidHeaderValueError) as info:
        static_credentials(resolve, bearer, headers)
    assert info.value.code == "invalid_header_value"
    assert bad not in info.value.message and "s-bad" in info.value.message


@pytest.mark.parametrize("template", ["{{secret}}\r\nX: y", "no placeholder", "{{secret}}{{secret}}"])
def test_a_stored_template_is_checked_again_on_the_worker(template: str) -> None:
    with pytest.raises(InvalidHeaderValueError):
        static_credentials(Resolver(), None, [HeaderSpec("X-K", template, "s-key")])


def test_the_repr_names_no_value() -> None:
    creds = static_credentials(Resolver(), "s-key", [HeaderSpec("X-K", "{{secret}}", "s-tok")])
    assert "VALUE" not in repr(creds) and "VALUE" not in str(creds)
