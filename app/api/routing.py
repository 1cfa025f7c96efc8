"""The thin edge: one decorator that parses, authenticates, authorises, calls, commits and renders.

Every JSON route is declared with :func:`route`, which records the request and response
models so the OpenAPI document is generated from the same declarations that validate
requests (``app.api.openapi``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from app.access import OrgRole, org_access
from app.api.idempotency import find_record, header_key, remember, replay, request_digest
from app.api.parsing import parse_json_body, parse_query
from app.api.request import authenticate, commit, current_user, session
from app.api.responses import json_response
from app.errors import ForbiddenError, IdempotencyInProgressError, LatchkeyError, NotFoundError

MAX_PATH_PARAM = 200


@dataclass
class RouteSpec:
    """What the OpenAPI generator needs to know about one operation."""

    rule: str
    method: str
    endpoint: str
    summary: str
    tags: list[str]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    auth: str
    errors: list[int] = field(default_factory=list)
    idempotent: bool = False
    headers: list[str] = field(default_factory=list)
    body_required: bool = True
    org_role: OrgRole | None = None

    def all_errors(self) -> list[int]:
        """The statuses this operation can answer with: the handler's own, plus the framework's.

        What :func:`route` itself raises follows from the declaration, so it is derived here
        rather than repeated (and forgotten) in every ``errors=[...]`` list.
        """
        codes = set(self.errors)
        if self.auth != "none":
            codes.add(401)
        if self.auth == "operator" or self.org_role == "admin":
            codes.add(403)
        if "<" in self.rule:
            codes.add(404)  # a path parameter that names nothing (or cannot name anything)
        if self.body is not None:
            codes |= {400, 413, 415, 422}  # invalid_json, payload_too_large, unsupported_media_type
        if self.query is not None:
            codes.add(422)
            if "cursor" in self.query.model_fields:
                codes.add(400)  # invalid_cursor
        if self.idempotent:
            codes |= {400, 409, 422}  # bad key, idempotency_in_progress, idempotency_key_reused
        return sorted(codes)


ROUTES: list[RouteSpec] = []

_CONVERTER = re.compile(r"<[a-z_]+:")


@dataclass
class Result:
    """A handler's answer: a model (or plain data), an optional status and headers."""

    body: Any
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _dump(body: Any) -> Any:
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json")
    return body


def route(
    bp: Blueprint,
    rule: str,
    method: str,
    *,
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    auth: str = "user",
    tags: list[str] | None = None,
    errors: list[int] | None = None,
    idempotent: bool = False,
    headers: list[str] | None = None,
    body_required: bool = True,
    org_role: OrgRole | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a JSON endpoint. ``auth`` is ``"user"``, ``"operator"`` or ``"none"``.

    The handler receives the path parameters, then ``body=`` and ``query=`` when declared,
    and returns a model, plain data, a :class:`Result` or ``None`` (204). With
    ``body_required=False`` an empty body is allowed and the handler gets ``body=None``.

    ``org_role`` (``"member"`` or ``"admin"``) on a rule with ``<org>``: the caller's
    :class:`~app.access.OrgAccess` replaces the ``org`` parameter as ``access=``; an
    org they are not in is 404, too low a role 403. Services check their own rule as well.
    """
    if org_role is not None and "<org>" not in rule:
        raise ValueError(f"org_role needs an <org> path parameter: {rule}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        summary = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        prefix = bp.url_prefix or ""
        ROUTES.append(
            RouteSpec(
                # Converters decide matching only; the declared shape is ``<name>``.
                rule=prefix + _CONVERTER.sub("<", rule),
                method=method.lower(),
                endpoint=f"{bp.name}.{fn.__name__}",
                summary=summary,
                tags=tags or [],
                body=body,
                query=query,
                response=response,
                status=status,
                auth=auth,
                errors=errors or [],
                idempotent=idempotent,
                headers=headers or [],
                body_required=body_required,
                org_role=org_role,
            )
        )

        @functools.wraps(fn)
        def view(**path: Any) -> Response:
            s = session()
            try:
                for value in path.values():
                    # Ids are short printable tokens; anything else cannot name a resource.
                    if not (0 < len(value) <= MAX_PATH_PARAM and value.isprintable()):
                        raise NotFoundError()
                if auth in ("user", "operator"):
                    user = authenticate()
                    if auth == "operator" and not user.is_operator:
                        raise ForbiddenError("this action is for instance operators")
                kwargs: dict[str, Any] = dict(path)
                if org_role is not None:
                    access = org_access(s, current_user(), kwargs.pop("org"))
                    access.require(org_role)
                    kwargs["access"] = access
                if query is not None:
                    kwargs["query"] = parse_query(query)
                if body is not None:
                    given = body_required or bool(request.get_data(cache=True).strip())
                    kwargs["body"] = parse_json_body(body) if given else None
                idem_key = header_key() if idempotent and auth != "none" else None
                digest = request_digest() if idem_key else ""
                if idem_key:
                    existing = find_record(s, current_user(), idem_key)
                    if existing is not None:
                        return replay(existing, digest)
                out = fn(**kwargs)
                if out is None:
                    resp = current_app.response_class(status=204)
                else:
                    result = out if isinstance(out, Result) else Result(out)
                    payload = _dump(result.body)
                    code = result.status or status
                    if idem_key:
                        remember(s, idem_key, digest, code, payload)
                    resp = json_response(payload, code, result.headers)
                commit(s)
                return resp
            except IntegrityError:
                s.rollback()
                if idem_key_in_flight := (idempotent and request.headers.get("Idempotency-Key")):
                    # A concurrent request with the same key won the insert: answer with its result.
                    existing = find_record(s, current_user(), idem_key_in_flight)
                    if existing is not None:
                        return replay(existing, request_digest())
                    raise IdempotencyInProgressError() from None
                raise
            except LatchkeyError:
                s.rollback()
                raise

        bp.add_url_rule(rule, fn.__name__, view, methods=[method.upper()])
        return view

    return decorator
