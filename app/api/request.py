"""The request's resources: its database session (one unit of work), its caller, its context.

Shared by the API and the UI (``app.web``): both end a request through :func:`commit`.
"""

from __future__ import annotations

from flask import current_app, g, request
from sqlalchemy.orm import Session

from app.context import Actor, RequestContext
from app.db import Database
from app.errors import UnauthorizedError
from app.identity import service as identity
from app.models import User


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


def commit(s: Session) -> None:
    """End a request's unit of work (API and UI alike); the session sends what it queued."""
    s.commit()
