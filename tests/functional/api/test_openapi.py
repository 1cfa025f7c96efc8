"""The OpenAPI 3.1 document: valid, complete (every route), and describing bodies and problems."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from app.pagination import CURSOR_PATTERN, MAX_CURSOR

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
PROBLEM_REF = "#/components/schemas/Problem"

# conftest's cleanup asks for `db` at teardown when `app` is used; request it up front.
_RULE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


@pytest.fixture
def doc(client: FlaskClient) -> dict[str, Any]:
    resp = client.get("/api/v1/openapi.json")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.get_json()
    return body


def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def test_document_is_served_without_auth_as_json(client: FlaskClient) -> None:
    resp = client.get("/api/v1/openapi.json")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    assert resp.get_json()["openapi"] == "3.1.0"


def test_document_is_a_valid_openapi_3_1_document(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_every_api_route_is_documented_with_its_methods(app: Flask, doc: dict[str, Any]) -> None:
    documented = {(path, method) for path, method, _op in _operations(doc)}
    expected: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.rule == "/api/v1/openapi.json":
            continue
        path = _RULE_PARAM.sub(r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            expected.add((path, method.lower()))
    assert expected, "no API routes found"
    missing = expected - documented
    assert not missing, f"routes missing from the OpenAPI document: {sorted(missing)}"
    # And nothing is documented that the app does not serve.
    assert documented <= expected


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for _p, _m, op in _operations(doc)]
    assert len(ids) == len(set(ids))


def test_path_parameters_are_declared_for_every_templated_segment(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        in_path = set(re.findall(r"{([^}]+)}", path))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == in_path, (path, method)


def test_secret_create_request_schema_has_name_and_value(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/api/v1/orgs/{org}/secrets"]["post"]
    schema_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = _resolve(doc, schema_ref)
    assert {"name", "value"} <= set(schema["properties"])
    assert {"name", "value"} <= set(schema.get("required", []))
    assert "201" in op["responses"]
    # The create response describes metadata, never the value.
    created_ref = op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"]
    created = _resolve(doc, created_ref)
    assert "version" in created["properties"]
    assert "value" not in created["properties"] and "ciphertext" not in created["properties"]


def test_error_responses_reference_the_problem_schema(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    error_responses = 0
    for path, method, op in _operations(doc):
        for status, response in op["responses"].items():
            if int(status) < 400:
                continue
            error_responses += 1
            content = response["content"]
            assert list(content) == ["application/problem+json"], (path, method, status)
            assert content["application/problem+json"]["schema"] == {"$ref": PROBLEM_REF}, (path, method, status)
    assert error_responses > 0


def test_authenticated_operations_declare_bearer_security(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    me = doc["paths"]["/api/v1/me"]["get"]
    assert me["security"] == [{"bearer": []}]
    assert "401" in me["responses"]


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                refs.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)


# What the framework itself answers is documented on every operation (issue #10, item 9) ----


def _statuses(op: dict[str, Any]) -> set[int]:
    return {int(code) for code in op["responses"]}


def test_framework_errors_are_documented_on_every_operation(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        statuses, where = _statuses(op), f"{method.upper()} {path}"
        if op.get("security"):
            assert 401 in statuses, where
        if "{" in path:
            assert 404 in statuses, where
        if "requestBody" in op:
            assert {400, 413, 415, 422} <= statuses, where  # invalid_json, too large, media type, validation
        names = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        if names:
            assert 422 in statuses, where
        if "cursor" in names:
            assert 400 in statuses, where  # invalid_cursor
        if "Idempotency-Key" in {p["name"] for p in op.get("parameters", [])}:
            assert {400, 409, 422} <= statuses, where


def test_operator_operations_document_403(doc: dict[str, Any]) -> None:
    for path, method, op in _operations(doc):
        if path.startswith("/api/v1/admin/"):
            assert 403 in _statuses(op), f"{method.upper()} {path}"


def test_operator_jobs_with_an_optional_body_declare_it(doc: dict[str, Any]) -> None:
    for path in ("/api/v1/admin/keys/reseal", "/api/v1/admin/backfill", "/api/v1/admin/backfill/verify"):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is False
        schema = _resolve(doc, body["content"]["application/json"]["schema"]["$ref"])
        assert "batch_size" in schema["properties"]
    ping = doc["paths"]["/api/v1/admin/jobs/ping"]["post"]
    assert "requestBody" not in ping


def test_cursors_are_declared_with_their_shape(doc: dict[str, Any]) -> None:
    cursors = [
        (path, p["schema"])
        for path, _method, op in _operations(doc)
        for p in op.get("parameters", [])
        if p["in"] == "query" and p["name"] == "cursor"
    ]
    assert cursors
    for path, schema in cursors:
        assert schema["type"] == "string" and "null" not in str(schema), path
        assert schema["pattern"] == CURSOR_PATTERN and schema["maxLength"] == MAX_CURSOR, path


def test_datetime_inputs_are_date_times(doc: dict[str, Any]) -> None:
    since = next(
        p["schema"]
        for p in doc["paths"]["/api/v1/orgs/{org}/audit-events"]["get"]["parameters"]
        if p["name"] == "since"
    )
    assert since["format"] == "date-time"
