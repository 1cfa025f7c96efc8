"""The identity input models of the CLI-only operations hold their field rules, word for word as the CLI prints them."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import ValidationFailedError
from app.identity.schemas import OrgCreate, PasswordSet, UserCreate
from app.schemas import validated

PASSWORD = "long-enough-password"
SLUG_RULE = "lowercase letters, digits and inner hyphens, 1 to 63 characters"


def _refusals(model: Any, data: dict[str, Any], **kw: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailedError) as exc:
        validated(model, data, **kw)
    return [(e.field, e.message) for e in exc.value.errors]


@pytest.mark.parametrize("slug", ["Bad_Slug", "has space", "trailing-", "-leading", "ünïcode", "", "x" * 64])
def test_a_bad_slug_is_refused_with_the_slug_rule(slug: str) -> None:
    assert _refusals(OrgCreate, {"slug": slug}) == [("slug", SLUG_RULE)]


@pytest.mark.parametrize("slug", ["a", "acme", "acme-2", "x" * 63])
def test_a_good_slug_is_kept_as_given(slug: str) -> None:
    assert validated(OrgCreate, {"slug": slug}).slug == slug


def test_an_org_without_a_name_is_named_after_its_slug_and_a_long_name_is_cut() -> None:
    assert OrgCreate(slug="acme").display_name == "acme"
    assert OrgCreate(slug="acme", name="").display_name == "acme"
    assert OrgCreate(slug="acme", name="Acme Corp").display_name == "Acme Corp"
    assert OrgCreate(slug="acme", name="n" * 300).display_name == "n" * 200


def test_a_user_email_is_normalised_and_checked() -> None:
    assert UserCreate(email="  Ops@Example.TEST ").email == "ops@example.test"
    assert _refusals(UserCreate, {"email": "not-an-address"}) == [("email", "not a valid email address")]


@pytest.mark.parametrize(
    ("password", "message"),
    [("x" * 11, "must be at least 12 characters"), ("x" * 1025, "must be at most 1024 characters")],
)
def test_a_password_outside_the_limits_is_refused_without_echoing_it(password: str, message: str) -> None:
    for model, data in (
        (UserCreate, {"email": "a@example.test", "password": password}),
        (PasswordSet, {"password": password}),
    ):
        with pytest.raises(ValidationFailedError) as exc:
            validated(model, data)
        assert [(e.field, e.message) for e in exc.value.errors] == [("password", message)]
        assert password not in str(exc.value)


@pytest.mark.parametrize("password", ["x" * 12, "x" * 1024])
def test_a_password_at_the_limits_is_accepted(password: str) -> None:
    assert validated(PasswordSet, {"password": password}).password == password
    assert validated(UserCreate, {"email": "a@example.test", "password": password}).password == password


def test_a_user_without_a_password_is_token_only_and_a_blank_one_means_none() -> None:
    assert UserCreate(email="a@example.test").password is None
    assert (
        validated(UserCreate, {"email": "a@example.test", "password": ""}, blank_is_none=("password",)).password is None
    )
    assert UserCreate(email="a@example.test").operator is False


def test_a_password_never_shows_in_a_models_repr() -> None:
    assert PASSWORD not in repr(PasswordSet(password=PASSWORD))
    assert PASSWORD not in repr(UserCreate(email="a@example.test", password=PASSWORD))


def test_unknown_fields_are_refused() -> None:
    assert _refusals(OrgCreate, {"slug": "acme", "owner": "x"}) == [("owner", "unknown field")]


@pytest.mark.parametrize("slug", ["abc\n", "abc\r\n", "\nabc"])
def test_a_slug_with_a_line_break_is_refused(slug: str) -> None:
    # ``$`` alone would match before a trailing newline: the rule matches the whole value.
    with pytest.raises(ValidationFailedError):
        validated(OrgCreate, {"slug": slug})
