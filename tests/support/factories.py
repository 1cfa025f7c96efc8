"""Factories: build orgs, users and tokens through the real services."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

from app.access import OrgAccess
from app.context import Actor, RequestContext
from app.db import AFTER_COMMIT, Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate, TokenCreate, UserCreate

CTX = RequestContext(Actor("system"), request_id="test")
_seq = itertools.count(1)


@dataclass
class Caller:
    """A user with a token, making API calls through the test client."""

    client: FlaskClient
    token: str
    user_id: str
    email: str

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **(extra or {})}

    def request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None, **kw: Any
    ) -> TestResponse:
        url = path if path.startswith("/") else f"/api/v1/{path}"
        return self.client.open(url, method=method, json=json, headers=self.headers(headers), **kw)

    def get(self, path: str, **kw: Any) -> TestResponse:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> TestResponse:
        return self.request("POST", path, json=json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> TestResponse:
        return self.request("PATCH", path, json=json, **kw)

    def delete(self, path: str, **kw: Any) -> TestResponse:
        return self.request("DELETE", path, **kw)


class Factory:
    def __init__(self, db: Database, client: FlaskClient) -> None:
        self.db = db
        self.client = client

    def org(self, slug: str | None = None) -> str:
        slug = slug or f"org-{next(_seq)}"
        with self.db.session() as s:
            identity.create_org(s, CTX, OrgCreate(slug=slug, name=slug.title()))
        return slug

    def user(
        self, org: str | None = None, role: str = "admin", *, operator: bool = False, password: str | None = None
    ) -> Caller:
        email = f"user{next(_seq)}@example.test"
        with self.db.session() as s:
            user = identity.create_user(s, CTX, UserCreate(email=email, password=password, operator=operator))
            if org:
                identity.add_member(s, CTX, OrgAccess.system(identity.get_org(s, org)), user, role)
            _tok, raw = identity.create_token(s, CTX, user, TokenCreate(name="test"))
            user_id = user.id
        return Caller(self.client, raw, user_id, email)

    def secret(
        self, caller: Caller, org: str, name: str | None = None, value: str = "s3cret-value-for-tests", **fields: Any
    ) -> dict[str, Any]:
        resp = caller.post(
            f"orgs/{org}/secrets", json={"name": name or f"SECRET_{next(_seq)}", "value": value, **fields}
        )
        assert resp.status_code == 201, resp.get_json()
        body: dict[str, Any] = resp.get_json()
        return body


def drop_queued(session: Session, kind: str = "publish") -> None:
    """Drop what this transaction queued for after its commit (a message "lost" on the way)."""
    assert kind in AFTER_COMMIT
    session.info.pop(kind, None)
