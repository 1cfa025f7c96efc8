"""Bad input gets a clear problem+json (400/413/415/422), never a 500, and changes nothing."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import func, select

from app.api import idempotency
from app.config import ConfigError, Environment, Settings, load_settings
from app.factory import create_app
from app.models import AuditEvent, IdempotencyKey, Secret
from app.pagination import CURSOR_PATTERN, encode_cursor
from tests.support.factories import Caller, Factory


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


# Nesting depth (issue #10, item 8) -------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000,
        '{"name": "N", "value": ' + "[" * 100_000,
        '{"name": "N", "value": "v", "description": ' + "[" * 40 + "]" * 40 + "}",
        '{"name": "N", "value": "v", "x": ' + '{"a":' * 50 + "1" + "}" * 50 + "}",
    ],
    ids=["100k-brackets", "100k-in-a-field", "depth-41-complete", "depth-51-objects"],
)
def test_deeply_nested_json_is_400_before_validation(admin: Caller, org: str, existing: Any, db: Any, raw: str) -> None:
    before = _state(db)
    problem = _assert_problem(_raw(admin, "POST", f"orgs/{org}/secrets", raw), 400, "invalid_json")
    assert "deeper than" in problem["detail"]
    _assert_problem(_raw(admin, "PATCH", f"orgs/{org}/secrets/{existing['id']}", raw), 400, "invalid_json")
    assert _state(db) == before


def test_nan_is_not_json(admin: Caller, org: str) -> None:
    _assert_problem(_raw(admin, "POST", f"orgs/{org}/secrets", '{"name": "N", "value": NaN}'), 400, "invalid_json")


# Cursors ---------------------------------------------------------------------------------


def _unsigned(value: Any) -> str:
    """A cursor as a client can forge one: base64url JSON, no signature."""
    return base64.urlsafe_b64encode(json.dumps({"k": value}).encode()).decode().rstrip("=")


FORGED_CURSORS = [
    ("huge-int", _unsigned(10**30)),
    ("int64-max-plus-1", _unsigned(2**63)),
    ("true", _unsigned(True)),
    ("string", _unsigned("zzzz")),
    ("int", _unsigned(5)),
    ("null", _unsigned(None)),
    ("list", _unsigned([1])),
    ("garbage", base64.urlsafe_b64encode(b"\xff\x00garbage").decode()),
    ("not-base64", "!!!"),
    ("dot-only", "."),
    ("bad-tag", _unsigned(1) + ".AAAAAAAAAAAAAAAAAAAAAA"),
    ("too-long", "a" * 600),
]
CURSOR_LISTS = ["secrets", "audit-events", "providers", "mcp-servers", "agents"]


@pytest.mark.parametrize("listing", CURSOR_LISTS)
@pytest.mark.parametrize(("case", "cursor"), FORGED_CURSORS, ids=[c[0] for c in FORGED_CURSORS])
def test_forged_cursor_is_400_invalid_cursor(admin: Caller, org: str, listing: str, case: str, cursor: str) -> None:
    _assert_problem(admin.get(f"orgs/{org}/{listing}", query_string={"cursor": cursor}), 400, "invalid_cursor")


SIGNED_BAD_KEYS: list[tuple[str, Any]] = [
    ("true", True),
    ("huge-int", 10**30),
    ("float", 1.5),
    ("null", None),
    ("object", {"a": 1}),
    ("empty-string", ""),
    ("nul", "a\x00b"),
    ("long-string", "x" * 5000),
    ("int-for-string-key", 5),
    ("string-for-int-key", "5"),
]


@pytest.mark.parametrize(("case", "value"), SIGNED_BAD_KEYS, ids=[c[0] for c in SIGNED_BAD_KEYS])
def test_signed_cursor_is_still_type_and_range_checked(
    app: Flask, admin: Caller, org: str, case: str, value: Any
) -> None:
    # Signed with the app's own key (as after a key leak or a bug): the decoded key is still checked.
    with app.test_request_context():
        secrets_cursor = encode_cursor(value, "secrets.id.asc")
        audit_cursor = encode_cursor(value, "audit_events.seq.desc")
    for listing, cursor in (("secrets", secrets_cursor), ("audit-events", audit_cursor)):
        resp = admin.get(f"orgs/{org}/{listing}", query_string={"cursor": cursor})
        if (listing, case) in {("secrets", "string-for-int-key"), ("audit-events", "int-for-string-key")}:
            assert resp.status_code == 200, resp.get_json()  # the right type for that list's key
        else:
            _assert_problem(resp, 400, "invalid_cursor")


def test_a_cursor_only_works_for_the_list_that_issued_it(admin: Caller, org: str, factory: Factory) -> None:
    for i in range(3):
        factory.secret(admin, org, name=f"PAGED_{i}")
    page = admin.get(f"orgs/{org}/secrets", query_string={"limit": 1}).get_json()
    cursor = page["next_cursor"]
    assert re.fullmatch(CURSOR_PATTERN, cursor)
    assert admin.get(f"orgs/{org}/secrets", query_string={"cursor": cursor}).status_code == 200
    for listing in ("providers", "mcp-servers", "agents", "audit-events"):
        _assert_problem(admin.get(f"orgs/{org}/{listing}", query_string={"cursor": cursor}), 400, "invalid_cursor")
    # One changed character in the payload is detected.
    payload, tag = cursor.split(".")
    flipped = ("B" if payload[0] != "B" else "C") + payload[1:]
    _assert_problem(
        admin.get(f"orgs/{org}/secrets", query_string={"cursor": f"{flipped}.{tag}"}), 400, "invalid_cursor"
    )


# Datetimes -------------------------------------------------------------------------------

BAD_DATETIMES = [
    ("overflow-past-9999", "9999-12-31T23:59:59-14:00"),
    ("overflow-before-0001", "0001-01-01T00:00:00+14:00"),
    ("naive", "2030-01-01T00:00:00"),
    ("date-only", "2030-01-01"),
    ("garbage", "soon"),
    ("unix-timestamp", "1700000000"),
    ("fraction", "0.5"),
]


@pytest.mark.parametrize(("case", "when"), BAD_DATETIMES, ids=[c[0] for c in BAD_DATETIMES])
def test_token_expires_at_must_be_aware_and_convertible_to_utc(admin: Caller, db: Any, case: str, when: str) -> None:
    before = _state(db)
    problem = _assert_problem(admin.post("me/tokens", json={"name": "t", "expires_at": when}), 422, "validation_error")
    assert [e["field"] for e in problem["errors"]] == ["expires_at"]
    assert _state(db) == before


@pytest.mark.parametrize(("case", "when"), BAD_DATETIMES, ids=[c[0] for c in BAD_DATETIMES])
def test_audit_since_must_be_aware_and_convertible_to_utc(admin: Caller, org: str, case: str, when: str) -> None:
    problem = _assert_problem(
        admin.get(f"orgs/{org}/audit-events", query_string={"since": when}), 422, "validation_error"
    )
    assert [e["field"] for e in problem["errors"]] == ["query.since"]


def test_datetimes_with_an_offset_are_taken_as_that_instant(admin: Caller, org: str) -> None:
    created = admin.post("me/tokens", json={"name": "t", "expires_at": "2090-01-01T01:30:00+02:00"})
    assert created.status_code == 201, created.get_json()
    expires = datetime.fromisoformat(created.get_json()["expires_at"])
    assert expires.replace(tzinfo=expires.tzinfo or UTC) == datetime(2089, 12, 31, 23, 30, tzinfo=UTC)
    assert admin.get(f"orgs/{org}/audit-events", query_string={"since": "9999-12-31T23:59:59+14:00"}).status_code == 200


# 405 -------------------------------------------------------------------------------------


def test_405_carries_allow(admin: Caller, org: str, existing: Any) -> None:
    resp = admin.request("PUT", f"orgs/{org}/secrets")
    _assert_problem(resp, 405, "method_not_allowed")
    assert {m.strip() for m in resp.headers["Allow"].split(",")} >= {"GET", "POST"}
    resp = admin.request("POST", f"orgs/{org}/secrets/{existing['id']}")
    _assert_problem(resp, 405, "method_not_allowed")
    assert {"GET", "PATCH", "DELETE"} <= {m.strip() for m in resp.headers["Allow"].split(",")}


# /metrics --------------------------------------------------------------------------------

METRICS_TOKEN = "metrics-token-" + "m" * 24


@pytest.fixture
def metrics_app(settings: Settings, db: Any, request: pytest.FixtureRequest) -> Iterator[Flask]:
    application = create_app(settings.model_copy(update=request.param))
    yield application
    application.extensions["latchkey.db"].dispose()


@pytest.mark.parametrize("metrics_app", [{"metrics_token": SecretStr(METRICS_TOKEN)}], indirect=True)
def test_metrics_with_a_token_set_needs_that_bearer_token(metrics_app: Flask) -> None:
    client = metrics_app.test_client()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        {"Authorization": f"Basic {METRICS_TOKEN}"},
        {"Authorization": METRICS_TOKEN},
    ):
        resp = client.get("/metrics", headers=headers)
        _assert_problem(resp, 401, "unauthorized")
        assert METRICS_TOKEN not in resp.get_data(as_text=True)
    resp = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200 and "latchkey_http_requests_total" in resp.get_data(as_text=True)


@pytest.mark.parametrize("metrics_app", [{"env": Environment.PRODUCTION}], indirect=True)
def test_metrics_without_a_token_is_not_served_in_production(metrics_app: Flask) -> None:
    client = metrics_app.test_client()
    _assert_problem(client.get("/metrics"), 404, "not_found")
    assert client.get("/healthz").status_code == 200


def test_metrics_token_is_a_secret_setting_with_a_file_variant(tmp_path: Any) -> None:
    path = tmp_path / "metrics-token"
    path.write_text(METRICS_TOKEN + "\n")
    loaded = load_settings({"LATCHKEY_METRICS_TOKEN_FILE": str(path)})
    assert loaded.metrics_token is not None and loaded.metrics_token.get_secret_value() == METRICS_TOKEN
    assert METRICS_TOKEN not in repr(loaded)
    with pytest.raises(ConfigError, match="LATCHKEY_METRICS_TOKEN"):
        load_settings({"LATCHKEY_METRICS_TOKEN": "short"})


# Idempotency digest (issue #10, "Also") --------------------------------------------------


def _stored_digest(db: Any) -> str:
    with db.session() as s:
        digests = s.scalars(select(IdempotencyKey.request_hmac)).all()
    assert len(digests) == 1
    return digests[0]


def _digest_of(app: Flask, path: str, body: dict[str, Any]) -> str:
    with app.test_request_context(path, method="POST", data=json.dumps(body), content_type="application/json"):
        return idempotency.request_digest()


def test_idempotency_digest_does_not_cover_the_secret_value(app: Flask, admin: Caller, org: str, db: Any) -> None:
    path = f"/api/v1/orgs/{org}/secrets"
    body = {"name": "IDEM", "value": "first-value-of-the-secret", "description": "d"}
    first = admin.post(f"orgs/{org}/secrets", json=body, headers={"Idempotency-Key": "idem-value"})
    assert first.status_code == 201
    stored = _stored_digest(db)
    # The digest of the same request with any other value is the stored one: it says nothing of the value.
    for other in ("another-value", "x", "first-value-of-the-secret" * 10):
        assert _digest_of(app, path, {**body, "value": other}) == stored
    assert _digest_of(app, path, {"value": "v", "description": "d", "name": "IDEM"}) == stored  # key order
    # ...but every other field, and whether a value was sent at all, still counts.
    assert _digest_of(app, path, {**body, "description": "e"}) != stored
    assert _digest_of(app, path, {"name": "IDEM", "description": "d"}) != stored
    assert _digest_of(app, f"/api/v1/orgs/{org}x/secrets", body) != stored

    # A repeat that differs only in the value replays the first answer (documented in docs/api.md).
    again = admin.post(
        f"orgs/{org}/secrets", json={**body, "value": "second-value"}, headers={"Idempotency-Key": "idem-value"}
    )
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == first.get_json()
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Secret).where(Secret.name == "IDEM")) == 1
    other = admin.post(
        f"orgs/{org}/secrets", json={**body, "description": "e"}, headers={"Idempotency-Key": "idem-value"}
    )
    _assert_problem(other, 422, "idempotency_key_reused")


def test_405_on_the_ping_path_advertises_only_post(factory: Factory) -> None:
    operator = factory.user(operator=True)
    for method in ("GET", "PUT", "DELETE"):
        resp = operator.request(method, "admin/jobs/ping")
        _assert_problem(resp, 405, "method_not_allowed")
        assert {m.strip() for m in resp.headers["Allow"].split(",")} - {"OPTIONS"} == {"POST"}
    assert operator.get("admin/jobs/not-a-job").status_code == 404


@pytest.mark.parametrize("path", ["admin/keys/reseal", "admin/backfill", "admin/backfill/verify"])
def test_operator_jobs_take_an_optional_body_and_refuse_a_bad_one(factory: Factory, path: str) -> None:
    operator = factory.user(operator=True)
    _assert_problem(_raw(operator, "POST", path, "[" * 1000), 400, "invalid_json")
    _assert_problem(_raw(operator, "POST", path, '{"batch_size": 0}'), 422, "validation_error")
    _assert_problem(_raw(operator, "POST", path, '{"batch_size": 1}', "text/plain"), 415, "unsupported_media_type")
    resp = _raw(operator, "POST", path, '{"batch_size": 7}')
    assert resp.status_code == 202, resp.get_json()
    resp = operator.client.post(f"/api/v1/{path}", headers=operator.headers())
    assert resp.status_code == 202, resp.get_json()
