"""The thin edge: one decorator that parses, authenticates, calls, commits and renders.

Every JSON route is declared with :func:`route`, which records the request and response
models so the OpenAPI document is generated from the same declarations that validate
requests (``app.api.openapi``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.access import OrgRole, org_access
from app.context import Actor, RequestContext
from app.db import Database, utcnow
from app.errors import (
    BadRequestError,
    FieldError,
    ForbiddenError,
    IdempotencyInProgressError,
    IdempotencyKeyReusedError,
    InvalidJsonError,
    LatchkeyError,
    NotFoundError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    ValidationFailedError,
)
from app.identity import service as identity
from app.models import IdempotencyKey, User
from app.schemas import field_errors

MAX_IDEMPOTENCY_KEY = 255
MAX_PATH_PARAM = 200
# No request body needs more than a few levels; refusing deeper ones bounds parsing work.
MAX_JSON_DEPTH = 32
# Body fields that carry a secret value: never part of an idempotency digest.
SECRET_BODY_FIELDS = ("value", "sealed_value")


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


# Request-scoped resources ----------------------------------------------------------------


def current_db() -> Database:
    db: Database = current_app.extensions["latchkey.db"]
    return db


def session() -> Session:
    """The request's session (one unit of work), opened on first use."""
    if "db_session" not in g:
        factory = current_db().sessionmaker
        assert factory is not None
        g.db_session = factory()
    s: Session = g.db_session
    return s


def close_session(_exc: BaseException | None = None) -> None:
    s: Session | None = g.pop("db_session", None)
    if s is not None:
        s.rollback()
        s.close()


def request_context() -> RequestContext:
    user: User | None = g.get("user")
    actor = Actor("user", user.id, user.is_operator) if user else Actor("anonymous")
    return RequestContext(actor=actor, request_id=g.get("request_id"), ip=request.remote_addr)


def current_user() -> User:
    user: User | None = g.get("user")
    if user is None:
        raise UnauthorizedError()
    return user


def authenticate() -> User:
    """Resolve the caller from ``Authorization: Bearer <token>``."""
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise UnauthorizedError("send an API token as 'Authorization: Bearer <token>'")
    user, token = identity.authenticate_token(session(), credential.strip())
    g.user = user
    g.api_token = token  # the parent of any token this request mints
    return user


# Parsing ---------------------------------------------------------------------------------


def _depth(data: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON (iteratively: no recursion to exhaust)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


def load_json(raw: bytes) -> Any:
    """Parse a JSON document, or raise ``invalid_json``: malformed, NaN/Infinity, or nested too deeply.

    pydantic-core's parser stops at 200 levels by itself (a ValueError, never a RecursionError);
    :data:`MAX_JSON_DEPTH` is the limit an API body must keep to.
    """
    try:
        data = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise InvalidJsonError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
        raise InvalidJsonError("the body is not valid JSON") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise InvalidJsonError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def parse_json_body(model: type[BaseModel]) -> BaseModel:
    """Strictly parse the JSON body: wrong types and unknown fields are 422, never coerced."""
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaTypeError("send the body as application/json")
    raw = request.get_data(cache=True)
    data = load_json(raw)
    if not isinstance(data, dict):
        raise ValidationFailedError.single("body", "must be a JSON object")
    try:
        # JSON mode: strict types, but ISO-8601 strings are accepted for datetimes.
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc)) from None


def parse_query(model: type[BaseModel]) -> BaseModel:
    args: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        if any("\x00" in v for v in values):
            raise ValidationFailedError.single(f"query.{key}", "must not contain NUL characters")
        args[key] = values[0] if len(values) == 1 else values
    try:
        return model.model_validate(args)
    except ValidationError as exc:
        raise ValidationFailedError(field_errors(exc, "query.")) from None


# Idempotency -----------------------------------------------------------------------------


def _digested_body() -> bytes:
    """The body as the idempotency digest sees it: secret-value fields replaced by a marker.

    A stored digest must not be a verifier for guesses of a secret value, so ``value`` and
    ``sealed_value`` are left out; the marker keeps *whether* they were sent. A repeat that
    differs only in the value therefore replays the first answer (docs/api.md).
    """
    raw = request.get_data(cache=True)
    try:
        data = load_json(raw)
    except InvalidJsonError:
        return raw
    if not isinstance(data, dict) or not any(f in data for f in SECRET_BODY_FIELDS):
        return raw
    masked = {k: ("<secret>" if k in SECRET_BODY_FIELDS else v) for k, v in data.items()}
    return json.dumps(masked, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _request_hmac() -> str:
    key = current_app.config["LATCHKEY_IDEMPOTENCY_KEY"]
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(request.method.encode() + b" " + request.path.encode() + b"\n")
    mac.update(_digested_body())
    return mac.hexdigest()


def _replay(record: IdempotencyKey, digest: str) -> Response:
    if not hmac.compare_digest(record.request_hmac, digest):
        raise IdempotencyKeyReusedError([FieldError("Idempotency-Key", "was already used with a different request")])
    resp = json_response(record.response_body, record.status_code)
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _find_idempotency(s: Session, user: User, key: str) -> IdempotencyKey | None:
    return s.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.user_id == user.id, IdempotencyKey.key == key, IdempotencyKey.expires_at > utcnow()
        )
    )


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise BadRequestError(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters")
    return key


# Responses -------------------------------------------------------------------------------


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = current_app.response_class(
        json.dumps(payload, separators=(",", ":"), ensure_ascii=False), status=status, mimetype="application/json"
    )
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


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


# The decorator ---------------------------------------------------------------------------


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
                idem_key = _idempotency_key() if idempotent and auth != "none" else None
                digest = _request_hmac() if idem_key else ""
                if idem_key:
                    existing = _find_idempotency(s, current_user(), idem_key)
                    if existing is not None:
                        return _replay(existing, digest)
                out = fn(**kwargs)
                if out is None:
                    resp = current_app.response_class(status=204)
                else:
                    result = out if isinstance(out, Result) else Result(out)
                    payload = _dump(result.body)
                    code = result.status or status
                    if idem_key:
                        _remember(s, idem_key, digest, code, payload)
                    resp = json_response(payload, code, result.headers)
                commit(s)
                return resp
            except IntegrityError:
                s.rollback()
                if idem_key_in_flight := (idempotent and request.headers.get("Idempotency-Key")):
                    # A concurrent request with the same key won the insert: answer with its result.
                    existing = _find_idempotency(s, current_user(), idem_key_in_flight)
                    if existing is not None:
                        return _replay(existing, _request_hmac())
                    raise IdempotencyInProgressError() from None
                raise
            except LatchkeyError:
                s.rollback()
                raise

        bp.add_url_rule(rule, fn.__name__, view, methods=[method.upper()])
        return view

    return decorator


def commit(s: Session) -> None:
    """End a request's unit of work (API and UI alike); the session sends what it queued."""
    s.commit()


def _remember(s: Session, key: str, digest: str, status_code: int, payload: Any) -> None:
    user = current_user()
    ttl = timedelta(seconds=current_app.config["LATCHKEY_SETTINGS"].idempotency_ttl_seconds)
    now = utcnow()
    # Expired keys of this user are dropped here, so the table stays bounded without a sweeper.
    s.execute(delete(IdempotencyKey).where(IdempotencyKey.user_id == user.id, IdempotencyKey.expires_at <= now))
    s.add(
        IdempotencyKey(
            user_id=user.id,
            key=key,
            request_hmac=digest,
            status_code=status_code,
            response_body=payload,
            expires_at=now + ttl,
        )
    )
    s.flush()
