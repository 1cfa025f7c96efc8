"""The OpenAPI 3.1 document, generated from the route declarations and pydantic models."""

from __future__ import annotations

import re
from importlib.metadata import version
from typing import Any, Literal

from apispec import APISpec
from flask import current_app
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.blueprint import bp
from app.api.responses import json_response
from app.api.routing import ROUTES, RouteSpec

REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"<(?:[a-z_]+:)?([a-z_]+)>")

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "Stable machine-readable error code."},
        "request_id": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}


Mode = Literal["validation", "serialization"]


def _models(routes: list[RouteSpec]) -> list[tuple[type[BaseModel], Mode]]:
    seen: dict[tuple[type[BaseModel], Mode], None] = {}
    for r in routes:
        if r.body:
            seen[(r.body, "validation")] = None
        if r.response:
            seen[(r.response, "serialization")] = None
    return list(seen)


def _query_value(prop: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: an optional field is left out, never sent as null, so drop the null branch."""
    branches = prop.get("anyOf")
    if not branches or {"type": "null"} not in branches:
        return prop
    rest = [b for b in branches if b != {"type": "null"}]
    out = {k: v for k, v in prop.items() if k != "anyOf" and not (k == "default" and v is None)}
    if len(rest) == 1:
        return {**rest[0], **out}
    return {**out, "anyOf": rest}


def build_spec(routes: list[RouteSpec] | None = None) -> dict[str, Any]:
    """Assemble the document: one operation per declared route."""
    routes = ROUTES if routes is None else routes
    spec = APISpec(
        title="Latchkey API",
        # The installed distribution's version, as `latchkey --version` reports it; importing
        # ``app.__version__`` here would make the package import its own API module back.
        version=version("latchkey"),
        openapi_version="3.1.0",
        info={"description": "Managed secrets for AI agents and MCP servers."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "description": "API token"})
    refs, defs = models_json_schema(_models(routes), ref_template=REF)
    for name, schema in sorted(defs.get("$defs", {}).items()):
        spec.components.schema(name, schema)
    spec.components.schema("Problem", PROBLEM_SCHEMA)

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        path = _PATH_PARAM.sub(r"{\1}", r.rule)
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.endpoint.split(".", 1)[1], "tags": r.tags}
        params: list[dict[str, Any]] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _PATH_PARAM.findall(r.rule)
        ]
        if r.query:
            qschema = r.query.model_json_schema(ref_template=REF)
            required = set(qschema.get("required", []))
            for name, prop in qschema.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in required, "schema": _query_value(prop)})
        if r.idempotent:
            params.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                }
            )
        for h in r.headers:
            params.append({"name": h, "in": "header", "required": False, "schema": {"type": "string"}})
        if params:
            op["parameters"] = params
        if r.body:
            op["requestBody"] = {
                "required": r.body_required,
                "content": {"application/json": {"schema": refs[(r.body, "validation")]}},
            }
        responses: dict[str, Any] = {}
        if r.status == 204:
            responses["204"] = {"description": "No content"}
        else:
            content = {"application/json": {"schema": refs[(r.response, "serialization")]}} if r.response else {}
            responses[str(r.status)] = {"description": "Success", **({"content": content} if content else {})}
        for code in r.all_errors():
            responses[str(code)] = {
                "description": "Problem",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        op["responses"] = responses
        if r.auth != "none":
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[r.method] = op
    for path, ops in paths.items():
        spec.path(path=path, operations=ops)
    return spec.to_dict()


@bp.get("/openapi.json")
def openapi_document():  # type: ignore[no-untyped-def]
    """The OpenAPI 3.1 document for this API."""
    doc = current_app.extensions.get("latchkey.openapi")
    if doc is None:
        doc = current_app.extensions["latchkey.openapi"] = build_spec()
    return json_response(doc)
