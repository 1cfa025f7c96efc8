"""Bad input gets a clear problem+json (400/413/415/422), never a 500, and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.models import AuditEvent, IdempotencyKey, Secret
from tests.factories import Caller, Factory


@pytest.fixture
def existing(factory: Factory, admin: Caller, org: str) -> dict[str, Any]:
    return factory.secret(admin, org, name="EXISTING", value="existing-value")


def _state(db: Any) -> tuple[Any, ...]:
    with db.session() as s:
        rows = s.execute(
            select(
                Secret.id, Secret.name, Secret.version, Secret.ciphertext, Secret.description, Secret.allowed_hosts
            ).order_by(Secret.id)
        ).all()
        return (
            tuple(tuple(r) for r in rows),
            s.scalar(select(func.count()).select_from(AuditEvent)),
            s.scalar(select(func.count()).select_from(IdempotencyKey)),
        )


def _raw(
    admin: Caller,
    method: str,
    path: str,
    data: bytes | str,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> Any:
    return admin.client.open(
        f"/api/v1/{path}",
        method=method,
        data=data,
        headers=admin.headers({"Content-Type": content_type, **(headers or {})}),
    )


def _assert_problem(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = resp.get_json()
    assert {"type", "title", "status", "detail", "code"} <= body.keys()
    assert body["status"] == status
    if code:
        assert body["code"] == code
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and "SELECT" not in text and "sqlalchemy" not in text.lower()
    return body


BAD_CREATE_BODIES: list[tuple[str, Any, str]] = [
    ("name-not-string", {"name": 5, "value": "v"}, "name"),
    ("value-not-string", {"name": "N", "value": 123}, "value"),
    ("value-bool", {"name": "N", "value": True}, "value"),
    ("value-null", {"name": "N", "value": None}, "value"),
    ("value-empty", {"name": "N", "value": ""}, "value"),
    ("value-missing", {"name": "N"}, "value"),
    ("name-missing", {"value": "v"}, "name"),
    ("name-empty", {"name": "", "value": "v"}, "name"),
    ("name-digit-first", {"name": "1ABC", "value": "v"}, "name"),
    ("name-space", {"name": "A B", "value": "v"}, "name"),
    ("name-too-long", {"name": "A" * 129, "value": "v"}, "name"),
    ("name-unicode", {"name": "CLÉ", "value": "v"}, "name"),
    ("name-slash", {"name": "a/b", "value": "v"}, "name"),
    ("unknown-field", {"name": "N", "value": "v", "token": "raw"}, "token"),
    ("hosts-not-list", {"name": "N", "value": "v", "allowed_hosts": "example.com"}, "allowed_hosts"),
    ("hosts-bad-entry", {"name": "N", "value": "v", "allowed_hosts": ["http://x.com/path"]}, "allowed_hosts.0"),
    ("hosts-int-entry", {"name": "N", "value": "v", "allowed_hosts": [7]}, "allowed_hosts.0"),
    (
        "hosts-too-many",
        {"name": "N", "value": "v", "allowed_hosts": [f"h{i}.example.com" for i in range(33)]},
        "allowed_hosts",
    ),
    ("description-not-string", {"name": "N", "value": "v", "description": ["x"]}, "description"),
    ("description-too-long", {"name": "N", "value": "v", "description": "d" * 1001}, "description"),
    ("value-over-64k", {"name": "N", "value": "a" * (64 * 1024 + 1)}, "value"),
    ("value-over-64k-multibyte", {"name": "N", "value": "é" * (32 * 1024 + 1)}, "value"),
]


@pytest.mark.parametrize(("case", "body", "field"), BAD_CREATE_BODIES, ids=[c[0] for c in BAD_CREATE_BODIES])
def test_bad_create_body_is_422_naming_the_field(
    admin: Caller, org: str, existing: Any, db: Any, case: str, body: Any, field: str
) -> None:
    before = _state(db)
    resp = admin.post(f"orgs/{org}/secrets", json=body)
    problem = _assert_problem(resp, 422, "validation_error")
    assert field in [e["field"] for e in problem["errors"]], problem
    assert _state(db) == before


def test_unknown_field_says_so(admin: Caller, org: str) -> None:
    problem = _assert_problem(admin.post(f"orgs/{org}/secrets", json={"name": "N", "value": "v", "extra": 1}), 422)
    assert problem["errors"] == [{"field": "extra", "message": "unknown field"}]


def test_value_of_exactly_64_kib_is_accepted(admin: Caller, org: str) -> None:
    assert admin.post(f"orgs/{org}/secrets", json={"name": "BIG", "value": "a" * 64 * 1024}).status_code == 201
    assert admin.post(f"orgs/{org}/secrets", json={"name": "BIG2", "value": "é" * 32 * 1024}).status_code == 201


BAD_PATCH_BODIES: list[tuple[str, Any]] = [
    ("empty-object", {}),
    ("value-empty", {"value": ""}),
    ("value-null", {"value": None}),
    ("name-null", {"name": None}),
    ("name-bad", {"name": "no spaces allowed"}),
    ("unknown", {"valu": "typo"}),
    ("value-too-big", {"value": "x" * (64 * 1024 + 1)}),
    ("hosts-bad", {"allowed_hosts": ["*"]}),
    ("valid-then-bad", {"value": "fine-value", "name": "bad name"}),
]


@pytest.mark.parametrize(("case", "body"), BAD_PATCH_BODIES, ids=[c[0] for c in BAD_PATCH_BODIES])
def test_bad_patch_is_422_and_leaves_the_secret_as_it_was(
    admin: Caller, org: str, existing: Any, db: Any, case: str, body: Any
) -> None:
    before = _state(db)
    _assert_problem(admin.patch(f"orgs/{org}/secrets/{existing['id']}", json=body), 422, "validation_error")
    assert _state(db) == before


@pytest.mark.parametrize("raw", ['{"name": "N", "value": ', "not json", "", "\xff\xfe", '{"a":1}{"b":2}'])
def test_malformed_json_is_400(admin: Caller, org: str, existing: Any, db: Any, raw: str) -> None:
    before = _state(db)
    _assert_problem(_raw(admin, "POST", f"orgs/{org}/secrets", raw), 400, "invalid_json")
    _assert_problem(_raw(admin, "PATCH", f"orgs/{org}/secrets/{existing['id']}", raw), 400, "invalid_json")
    assert _state(db) == before


@pytest.mark.parametrize("raw", ["[]", '"string"', "42", "null", '[{"name":"N","value":"v"}]'])
def test_json_that_is_not_an_object_is_422(admin: Caller, org: str, raw: str) -> None:
    _assert_problem(_raw(admin, "POST", f"orgs/{org}/secrets", raw), 422, "validation_error")


def test_wrong_content_type_is_415(admin: Caller, org: str, db: Any) -> None:
    before = _state(db)
    _assert_problem(
        _raw(admin, "POST", f"orgs/{org}/secrets", '{"name":"N","value":"v"}', "text/plain"),
        415,
        "unsupported_media_type",
    )
    _assert_problem(
        _raw(admin, "POST", f"orgs/{org}/secrets", "name=N&value=v", "application/x-www-form-urlencoded"), 415
    )
    assert _state(db) == before


def test_body_over_the_request_limit_is_413(admin: Caller, org: str, db: Any) -> None:
    before = _state(db)
    huge = json.dumps({"name": "N", "value": "a" * (600 * 1024)})
    _assert_problem(_raw(admin, "POST", f"orgs/{org}/secrets", huge), 413, "payload_too_large")
    assert _state(db) == before


def test_huge_headers_are_client_errors(admin: Caller, org: str, existing: Any, db: Any) -> None:
    before = _state(db)
    big = "x" * 16_000
    _assert_problem(
        admin.post(f"orgs/{org}/secrets", json={"name": "H", "value": "v"}, headers={"Idempotency-Key": big}),
        400,
        "bad_request",
    )
    _assert_problem(
        admin.patch(f"orgs/{org}/secrets/{existing['id']}", json={"value": "v"}, headers={"If-Match": big}),
        412,
        "version_mismatch",
    )
    _assert_problem(
        admin.client.get(f"/api/v1/orgs/{org}/secrets", headers={"Authorization": "Bearer lk_" + big}),
        401,
        "unauthorized",
    )
    resp = admin.get(f"orgs/{org}/secrets", headers={"X-Request-ID": big})
    assert resp.status_code == 200 and len(resp.headers["X-Request-ID"]) <= 128
    assert _state(db) == before


def test_unknown_route_and_method_are_problems(admin: Caller, org: str) -> None:
    _assert_problem(admin.get("no/such/route"), 404, "not_found")
    _assert_problem(admin.request("PUT", f"orgs/{org}/secrets"), 405, "method_not_allowed")


def test_nonexistent_secret_id_shapes_are_404(admin: Caller, org: str) -> None:
    for bogus in ["x", "0" * 36, "'; DROP TABLE secrets; --", "%00", "a" * 300]:
        _assert_problem(admin.get(f"orgs/{org}/secrets/{bogus}"), 404, "not_found")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(
        st.sampled_from(["name", "value", "description", "allowed_hosts", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3)
        ),
        max_size=5,
    )
)
def test_arbitrary_bodies_never_500(admin: Caller, org: str, body: dict[str, Any]) -> None:
    resp = admin.post(f"orgs/{org}/secrets", json=body)
    assert resp.status_code in (201, 409, 422), resp.get_data(as_text=True)
    if resp.status_code == 201:
        admin.delete(f"orgs/{org}/secrets/{resp.get_json()['id']}")
