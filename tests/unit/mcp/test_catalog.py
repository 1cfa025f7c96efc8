"""The header credential rules of app.mcp.catalog: names, templates and a server's set of names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from app.mcp import catalog

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@pytest.mark.parametrize("name", ["X-API-Key", "Authorization", "x_token", "A", "a!b#c$d%e&f'g*h+i.j^k`l|m~n"])
def test_token_names_are_accepted_as_given(name: str) -> None:
    assert catalog.header_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "X API", "X-Key:", "X\r\nY", "Ünicode", "a" * 129, "(paren)", 'q"uote', "semi;colon", None],
)
def test_non_token_names_are_refused(name: str | None) -> None:
    with pytest.raises(PydanticCustomError, match="must be a header name"):
        catalog.header_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        "Content-Type",
        "Transfer-Encoding",
        "Cookie",
        "Accept",
        "Proxy-Authorization",
        "Sec-Fetch-Mode",
        "MCP-Session-Id",
        "Mcp-Protocol-Version",
        "Last-Event-ID",
        "Origin",
        "X-Forwarded-For",
        "x-forwarded-host",
        "TE",
    ],
)
def test_reserved_names_are_refused_in_any_case(name: str) -> None:
    with pytest.raises(PydanticCustomError, match="pick another header name") as info:
        catalog.header_name(name)
    assert name not in str(info.value)  # messages never quote a submitted value


@given(st.text(alphabet=TCHARS, min_size=1, max_size=128))
def test_every_token_is_a_name_unless_reserved(name: str) -> None:
    key = name.lower()
    reserved = key in catalog.RESERVED_HEADERS or key.startswith(catalog.RESERVED_PREFIXES)
    try:
        assert catalog.header_name(name) == name
        assert not reserved
    except PydanticCustomError:
        assert reserved


NON_TOKEN = st.characters().filter(lambda c: c not in TCHARS)


@given(st.text(alphabet=TCHARS, max_size=20), NON_TOKEN, st.text(max_size=20))
def test_anything_with_a_non_token_character_is_refused(before: str, bad: str, after: str) -> None:
    with pytest.raises(PydanticCustomError):
        catalog.header_name(before + bad + after)


@pytest.mark.parametrize("template", ["{{secret}}", "token {{secret}}", "Bearer {{secret}} ", "k={{secret}};v=1"])
def test_templates_with_one_placeholder_are_accepted(template: str) -> None:
    assert catalog.header_template(template) == template


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("no placeholder", "exactly once"),
        ("{{secret}}{{secret}}", "exactly once"),
        ("{{ secret }}", "exactly once"),
        ("{{secret}}\r\nX-Evil: 1", "visible ASCII"),
        ("{{secret}}\n", "visible ASCII"),
        ("a\x00{{secret}}", "visible ASCII"),
        ("\t{{secret}}", "visible ASCII"),
        ("é {{secret}}", "visible ASCII"),
        ("x" * 991 + "{{secret}}", "at most 1000"),
        (None, "at most 1000"),
    ],
)
def test_bad_templates_are_refused_with_what_to_do(template: str | None, match: str) -> None:
    with pytest.raises(PydanticCustomError, match=match):
        catalog.header_template(template)


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_a_visible_ascii_text_around_one_placeholder_is_a_template(text: str) -> None:
    template = text.replace("{{secret}}", "") + "{{secret}}"
    if template.count("{{secret}}") == 1:  # the cut may itself form a placeholder ("{{sec{{secret}}ret}}")
        assert catalog.header_template(template) == template


@given(st.text(max_size=30), st.sampled_from(["\r", "\n", "\x00", "\r\n"]), st.text(max_size=30))
def test_a_line_break_or_nul_anywhere_is_refused(before: str, bad: str, after: str) -> None:
    with pytest.raises(PydanticCustomError):
        catalog.header_template(before + bad + after + "{{secret}}")


def test_names_are_unique_case_insensitively() -> None:
    assert catalog.header_names(["X-Key", "X-Other"], bearer=False) == []
    problems = catalog.header_names(["X-Key", "x-key", "X-KEY"], bearer=False)
    assert [i for i, _ in problems] == [1, 2]
    assert "header 1" in problems[0][1]


def test_authorization_is_refused_only_next_to_the_bearer_secret_ref() -> None:
    assert catalog.header_names(["Authorization"], bearer=False) == []
    [(index, message)] = catalog.header_names(["X-Key", "authorization"], bearer=True)
    assert index == 1 and "secret_ref" in message
