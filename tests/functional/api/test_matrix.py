"""Tenancy and role matrices over every org-scoped endpoint.

Another org's ids (or an org the caller is not in) answer 404; a member without the admin
role gets 403 on admin-only actions and changes nothing; no token is 401. The table below
must cover every declared route, so a new endpoint cannot skip the matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from app.api.routing import ROUTES
from app.db import Database
from app.models import AuditEvent, Membership, Org, Secret
from tests.conftest import empty_tables
from tests.support.factories import Caller, Factory, drop_queued


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {org}, {secret}, {user} are filled in per case
    admin_only: bool
    body: dict[str, Any] | None = None
    # Succeeding needs a real authorization server and a worker: tests/e2e/workers/test_oauth_connections.py.
    succeeds_in: str | None = None
    variant: str = ""  # tells apart two cases of one route

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}" + (f" ({self.variant})" if self.variant else "")

    @property
    def rule(self) -> str:
        return "/api/v1/" + (
            self.path.replace("{org}", "<org>")
            .replace("{secret}", "<secret_id>")
            .replace("{user}", "<user_id>")
            .replace("{job}", "<job_id>")
            .replace("{mcp}", "<server_id>")
            .replace("{oauth}", "<server_id>")
            .replace("{provider}", "<provider_id>")
            .replace("{agent}", "<agent_id>")
            .replace("{run}", "<run_id>")
            .replace("{invitation}", "<invitation_id>")
        )


ENDPOINTS = [
    Endpoint("GET", "orgs/{org}/secrets", False),
    Endpoint("POST", "orgs/{org}/secrets", True, {"name": "MATRIX_NEW", "value": "matrix-value"}),
    Endpoint("GET", "orgs/{org}/secrets/{secret}", False),
    Endpoint("PATCH", "orgs/{org}/secrets/{secret}", True, {"value": "changed-by-matrix"}),
    Endpoint("DELETE", "orgs/{org}/secrets/{secret}", True),
    Endpoint("POST", "orgs/{org}/secrets/{secret}/reveal", True),
    Endpoint("GET", "orgs/{org}/audit-events", True),
    Endpoint("GET", "orgs/{org}/members", False),
    # Adding a member is an invitation (202); the invitee accepts it at POST /invitations/accept.
    Endpoint("POST", "orgs/{org}/members", True, {"email": "{email}", "role": "member"}),
    Endpoint("GET", "orgs/{org}/invitations", True),
    Endpoint("DELETE", "orgs/{org}/invitations/{invitation}", True),
    Endpoint("PATCH", "orgs/{org}/members/{user}", True, {"role": "admin"}),
    Endpoint("DELETE", "orgs/{org}/members/{user}", True),
    Endpoint("GET", "orgs/{org}/jobs/{job}", False),
    Endpoint("GET", "orgs/{org}/mcp-servers", False),
    # Binding a secret, moving or deleting a server that has one: admin only.
    Endpoint(
        "POST", "orgs/{org}/mcp-servers", True, {"name": "M", "url": "https://m.test/mcp", "secret_ref": "{secret}"}
    ),
    Endpoint("GET", "orgs/{org}/mcp-servers/{mcp}", False),
    # A credential header binds a secret too ("{{{{secret}}}}" is the template's "{{secret}}" once filled in).
    Endpoint(
        "POST",
        "orgs/{org}/mcp-servers",
        True,
        {
            "name": "MH",
            "url": "https://m.test/mcp",
            "headers": [{"name": "X-API-Key", "template": "{{{{secret}}}}", "secret_ref": "{secret}"}],
        },
        variant="header secret",
    ),
    Endpoint("PATCH", "orgs/{org}/mcp-servers/{mcp}", True, {"url": "https://elsewhere.test/mcp"}),
    Endpoint(
        "PATCH",
        "orgs/{org}/mcp-servers/{mcp}",
        True,
        {"headers": [{"name": "X-API-Key", "template": "key {{{{secret}}}}", "secret_ref": "{secret}"}]},
        variant="header secret",
    ),
    Endpoint("DELETE", "orgs/{org}/mcp-servers/{mcp}", True),
    Endpoint("POST", "orgs/{org}/mcp-servers/{mcp}/validate", False),
    Endpoint("GET", "orgs/{org}/mcp-servers/{mcp}/tools", False),
    # A per-user OAuth server: members connect and disconnect themselves.
    Endpoint(
        "POST",
        "orgs/{org}/mcp-servers/{oauth}/connect",
        False,
        succeeds_in="tests/e2e/workers/test_oauth_connections.py",
    ),
    Endpoint("GET", "orgs/{org}/mcp-servers/{oauth}/connection", False),
    Endpoint("DELETE", "orgs/{org}/mcp-servers/{oauth}/connection", False),
    Endpoint("GET", "orgs/{org}/providers", False),
    Endpoint(
        "POST",
        "orgs/{org}/providers",
        True,
        {"name": "P2", "provider_type": "openai", "model_id": "m", "secret_ref": "{secret}"},
    ),
    Endpoint("GET", "orgs/{org}/providers/{provider}", False),
    Endpoint("PATCH", "orgs/{org}/providers/{provider}", True, {"model_id": "other-model"}),
    Endpoint("DELETE", "orgs/{org}/providers/{provider}", True),
    # Agents: any member (they pick a provider an admin configured, never a secret).
    Endpoint("GET", "orgs/{org}/agents", False),
    Endpoint("POST", "orgs/{org}/agents", False, {"name": "A2", "provider_id": "{provider}"}),
    Endpoint("GET", "orgs/{org}/agents/{agent}", False),
    Endpoint("PATCH", "orgs/{org}/agents/{agent}", False, {"system_prompt": "Be brief."}),
    Endpoint("DELETE", "orgs/{org}/agents/{agent}", False),
    Endpoint("POST", "orgs/{org}/agents/{agent}/runs", False, {"input": "hi"}),
    Endpoint("GET", "orgs/{org}/runs/{run}", False),
]
OPERATOR_ONLY = [
    Endpoint("GET", "admin/jobs/{job}", True),
    Endpoint("POST", "admin/jobs/ping", True),
    Endpoint("POST", "admin/keys/reseal", True),
    Endpoint("POST", "admin/backfill", True),
    Endpoint("GET", "admin/backfill", True),
    Endpoint("POST", "admin/backfill/verify", True),
]
ORG_SCOPED = [e for e in ENDPOINTS if "{org}" in e.path]


def test_matrix_covers_every_org_scoped_and_operator_route() -> None:
    declared = {(r.method.upper(), r.rule) for r in ROUTES if "<org>" in r.rule}
    covered = {(e.method, e.rule) for e in ORG_SCOPED}
    assert declared == covered
    operator = {(r.method.upper(), r.rule) for r in ROUTES if r.auth == "operator"}
    assert operator == {(e.method, e.rule) for e in OPERATOR_ONLY}


@pytest.mark.parametrize("endpoint", OPERATOR_ONLY, ids=lambda e: e.id)
def test_operator_endpoints_refuse_org_admins(world: World, endpoint: Endpoint, db: Any) -> None:
    before = _snapshot(db)
    resp = world.admin.request(endpoint.method, endpoint.path.format(job=world.job))
    assert resp.status_code == 403 and resp.get_json()["code"] == "forbidden"
    assert _snapshot(db) == before


def test_operator_cannot_read_an_org_job_as_an_instance_job(world: World, factory: Factory) -> None:
    operator = factory.user(operator=True)
    assert operator.get(f"admin/jobs/{world.job}").status_code == 404


@dataclass
class World:
    org: str
    admin: Caller
    member: Caller
    secret: str
    outsider_email: str
    other_org: str
    other_admin: Caller
    other_secret: str
    other_member_id: str
    job: str
    other_job: str
    mcp: str
    other_mcp: str
    oauth: str
    other_oauth: str
    provider: str
    other_provider: str
    agent: str
    other_agent: str
    run: str
    other_run: str
    invitation: str
    other_invitation: str


@pytest.fixture
def world(factory: Factory) -> World:
    """A fresh world for a test that may change it (its tables are emptied after the test)."""
    return _build_world(factory, "home", "away")


@pytest.fixture(scope="module")
def _module_world(db: Database, app: Flask) -> Iterator[World]:
    built = _build_world(Factory(db, app.test_client()), "shared-home", "shared-away")
    yield built
    empty_tables(db)


@pytest.fixture
def shared_world(_module_world: World, db: Database) -> World:
    """One world for the tests that must change nothing (marked ``shared_data``: their tables are
    not emptied after each test). They run one after another, before any test that empties the
    tables; this check fails loudly if a reordering ever lets one run on an emptied world."""
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Org).where(Org.slug == _module_world.org)) == 1
    return _module_world


def _build_world(factory: Factory, home: str, away: str) -> World:
    org, other = factory.org(home), factory.org(away)
    admin, member = factory.user(org, "admin"), factory.user(org, "member")
    other_admin, other_member = factory.user(other, "admin"), factory.user(other, "member")
    outsider = factory.user()
    job, other_job = _job(factory, org), _job(factory, other)
    home_secret = factory.secret(admin, org, name="HOME")["id"]
    away_secret = factory.secret(other_admin, other, name="AWAY")["id"]
    home_provider = _provider(admin, org, factory.secret(admin, org, name="HOME_KEY")["id"])
    away_provider = _provider(other_admin, other, factory.secret(other_admin, other, name="AWAY_KEY")["id"])
    # The agents use providers of their own, so the world's providers stay deletable.
    home_agent = _agent(admin, org, _provider(admin, org, factory.secret(admin, org, name="AGENT_KEY")["id"], "AP"))
    away_agent = _agent(
        other_admin,
        other,
        _provider(other_admin, other, factory.secret(other_admin, other, name="AGENT_KEY")["id"], "AP"),
    )
    return World(
        job=job,
        other_job=other_job,
        # Bound to secrets of their own, so deleting the world's secret is still allowed.
        mcp=_mcp(factory, org, factory.secret(admin, org, name="HOME_MCP")["id"]),
        other_mcp=_mcp(factory, other, factory.secret(other_admin, other, name="AWAY_MCP")["id"]),
        oauth=_oauth(factory, org, [admin.user_id, member.user_id]),
        other_oauth=_oauth(factory, other, [other_admin.user_id, other_member.user_id]),
        provider=home_provider,
        other_provider=away_provider,
        agent=home_agent,
        other_agent=away_agent,
        run=_run(factory, org, home_agent),
        other_run=_run(factory, other, away_agent),
        invitation=_invitation(factory, org),
        other_invitation=_invitation(factory, other),
        org=org,
        admin=admin,
        member=member,
        secret=home_secret,
        outsider_email=outsider.email,
        other_org=other,
        other_admin=other_admin,
        other_secret=away_secret,
        other_member_id=other_member.user_id,
    )


def _job(factory: Factory, slug: str) -> str:
    from app.identity import service as identity
    from app.jobs import service as jobs
    from tests.support.factories import CTX

    with factory.db.session() as s:
        org_id = identity.get_org(s, slug).id
        # Created but never published: the row is all the matrix needs.
        return jobs.create_job(s, CTX, org_id=org_id, kind="system.ping").id


def _ids(world: World, *, own: bool, user: str) -> dict[str, str]:
    """The ids of one org's resources (own=False: the other org's), for paths and bodies."""
    w = world
    return {
        "secret": w.secret if own else w.other_secret,
        "job": w.job if own else w.other_job,
        "mcp": w.mcp if own else w.other_mcp,
        "oauth": w.oauth if own else w.other_oauth,
        "provider": w.provider if own else w.other_provider,
        "agent": w.agent if own else w.other_agent,
        "run": w.run if own else w.other_run,
        "invitation": w.invitation if own else w.other_invitation,
        "user": user,
        "email": w.outsider_email,
    }


def _mcp(factory: Factory, slug: str, secret_id: str) -> str:
    from app.db import new_id
    from app.identity import service as identity
    from app.models import McpServer

    with factory.db.session() as s:
        server = McpServer(
            id=new_id(),
            org_id=identity.get_org(s, slug).id,
            name="Bound",
            url="https://bound.test/mcp",
            secret_ref=secret_id,
        )
        s.add(server)
        return server.id


def _oauth(factory: Factory, slug: str, connected_users: list[str]) -> str:
    """A per-user OAuth server, and a connection (rows only) for each of these users."""
    from app.db import new_id, utcnow
    from app.identity import service as identity
    from app.models import ConnectionStatus, McpConnection, McpServer
    from app.models.connections import user_subject

    with factory.db.session() as s:
        org_id = identity.get_org(s, slug).id
        server = McpServer(
            id=new_id(),
            org_id=org_id,
            name="OAuth",
            url="https://oauth.test/mcp",
            auth_type="oauth",
            connection_scope="user",
        )
        s.add(server)
        s.flush()
        for user_id in connected_users:
            s.add(
                McpConnection(
                    id=new_id(),
                    org_id=org_id,
                    mcp_server_id=server.id,
                    subject=user_subject(user_id),
                    user_id=user_id,
                    status=ConnectionStatus.CONNECTED,
                    scopes=[],
                    wanted_scopes=[],
                    connected_at=utcnow(),
                )
            )
        return server.id


def _provider(caller: Caller, slug: str, secret_id: str, name: str = "P") -> str:
    body = {"name": name, "provider_type": "openai", "model_id": "m", "secret_ref": secret_id}
    resp = caller.post(f"orgs/{slug}/providers", json=body)
    assert resp.status_code == 201, resp.get_json()
    provider_id: str = resp.get_json()["id"]
    return provider_id


def _agent(caller: Caller, slug: str, provider_id: str) -> str:
    resp = caller.post(f"orgs/{slug}/agents", json={"name": "Agent", "provider_id": provider_id})
    assert resp.status_code == 201, resp.get_json()
    agent_id: str = resp.get_json()["id"]
    return agent_id


def _run(factory: Factory, slug: str, agent_id: str) -> str:
    from app.access import OrgAccess
    from app.agents import service as agents
    from app.agents.schemas import RunCreate
    from app.identity import service as identity
    from app.models import Role
    from tests.support.factories import CTX

    with factory.db.session() as s:
        access = OrgAccess(identity.get_org(s, slug), Role.MEMBER)
        run, _job = agents.start_run(s, CTX, access, agent_id, RunCreate(input="hello"))

        drop_queued(s)  # never published: the row is all the matrix needs
        return run.id


def _invitation(factory: Factory, slug: str) -> str:
    from datetime import timedelta

    from app.access import OrgAccess
    from app.identity import service as identity
    from app.identity.schemas import MemberAdd
    from tests.support.factories import CTX

    with factory.db.session() as s:
        org = identity.get_org(s, slug)
        data = MemberAdd(email=f"invited@{slug}.test", role="member")
        return identity.invite(s, CTX, OrgAccess.system(org), data, timedelta(days=1)).invitation.id


def _call(caller: Caller, e: Endpoint, org: str, ids: dict[str, str]) -> Any:
    """Call ``e`` in ``org`` with resource ids (and body placeholders) taken from ``ids``."""
    path = e.path.format(org=org, **ids)
    return caller.request(e.method, path, json=_filled(e.body, ids))


def _filled(value: Any, ids: dict[str, str]) -> Any:
    """``value`` with the placeholders of every string in it (at any depth) filled in from ``ids``."""
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _filled(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_filled(v, ids) for v in value]
    return value


def _snapshot(db: Any) -> tuple[int, ...]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(Secret)) or 0,
            s.scalar(select(func.max(Secret.version))) or 0,
            s.scalar(select(func.count()).select_from(Membership)) or 0,
            s.scalar(select(func.count()).select_from(AuditEvent)) or 0,
        )


@pytest.mark.shared_data
@pytest.mark.parametrize("endpoint", ORG_SCOPED, ids=lambda e: e.id)
def test_another_orgs_ids_are_404(shared_world: World, endpoint: Endpoint, db: Any) -> None:
    world = shared_world
    has_ids = any(
        p in endpoint.path
        for p in ("{secret}", "{user}", "{job}", "{mcp}", "{oauth}", "{provider}", "{agent}", "{run}", "{invitation}")
    )
    if has_ids:
        # The caller's own org in the path, with the other org's resource ids.
        before = _snapshot(db)
        own_path = _call(world.admin, endpoint, world.org, _ids(world, own=False, user=world.other_member_id))
        assert own_path.status_code == 404, own_path.get_json()
        assert own_path.get_json()["code"] == "not_found"
        assert _snapshot(db) == before
    # The other org's slug: not a member, so the org itself does not exist for this caller.
    before = _snapshot(db)
    foreign = _call(world.admin, endpoint, world.other_org, _ids(world, own=False, user=world.other_member_id))
    assert foreign.status_code == 404, foreign.get_json()
    assert foreign.content_type == "application/problem+json"
    assert _snapshot(db) == before


@pytest.mark.shared_data
@pytest.mark.parametrize("endpoint", [e for e in ORG_SCOPED if e.admin_only], ids=lambda e: e.id)
def test_member_gets_403_on_admin_only_actions_and_nothing_changes(
    shared_world: World, endpoint: Endpoint, db: Any
) -> None:
    world = shared_world
    before = _snapshot(db)
    resp = _call(world.member, endpoint, world.org, _ids(world, own=True, user=world.admin.user_id))
    assert resp.status_code == 403, resp.get_json()
    assert resp.get_json()["code"] == "forbidden"
    assert _snapshot(db) == before


@pytest.mark.shared_data
@pytest.mark.parametrize("endpoint", ORG_SCOPED, ids=lambda e: e.id)
@pytest.mark.parametrize("auth", [None, "Bearer lk_not-a-real-token", "Basic abc", "Bearer "])
def test_missing_or_invalid_token_is_401(
    shared_world: World, endpoint: Endpoint, auth: str | None, client: Any
) -> None:
    world = shared_world
    path = "/api/v1/" + endpoint.path.format(org=world.org, **_ids(world, own=True, user=world.admin.user_id))
    headers = {"Authorization": auth} if auth is not None else {}
    resp = client.open(path, method=endpoint.method, json=endpoint.body and {"x": 1}, headers=headers)
    assert resp.status_code == 401
    assert resp.get_json()["code"] == "unauthorized"


@pytest.mark.parametrize(
    "endpoint", [e for e in ORG_SCOPED if not e.admin_only and not e.succeeds_in], ids=lambda e: e.id
)
def test_member_may_use_member_endpoints(world: World, endpoint: Endpoint) -> None:
    resp = _call(world.member, endpoint, world.org, _ids(world, own=True, user=world.admin.user_id))
    assert resp.status_code in (200, 201, 202, 204), resp.get_json()


@pytest.mark.parametrize("endpoint", [e for e in ORG_SCOPED if not e.succeeds_in], ids=lambda e: e.id)
def test_admin_succeeds_in_own_org(world: World, endpoint: Endpoint, request: pytest.FixtureRequest) -> None:
    if endpoint.path.endswith("/reveal"):
        request.getfixturevalue("worker")  # a reveal is answered by a worker
    target_user = world.member.user_id
    resp = _call(world.admin, endpoint, world.org, _ids(world, own=True, user=target_user))
    assert resp.status_code in (200, 201, 202, 204), resp.get_json()


def test_revoked_and_expired_tokens_are_401(factory: Factory, db: Any, client: Any) -> None:
    from datetime import timedelta

    from app.db import utcnow
    from app.models import ApiToken

    org = factory.org()
    caller = factory.user(org, "admin")
    assert caller.get("me").status_code == 200
    with db.session() as s:
        tok = s.scalar(select(ApiToken).where(ApiToken.user_id == caller.user_id))
        assert tok is not None and tok.last_used_at is not None
        tok.expires_at = utcnow() - timedelta(seconds=1)
    assert caller.get("me").status_code == 401
    with db.session() as s:
        tok = s.scalar(select(ApiToken).where(ApiToken.user_id == caller.user_id))
        assert tok is not None
        tok.expires_at = None
        tok.revoked_at = utcnow()
    assert caller.get("me").status_code == 401


def test_tokens_of_another_user_are_404(factory: Factory) -> None:
    a, b = factory.user(), factory.user()
    b_tokens = b.get("me/tokens").get_json()["items"]
    assert a.delete(f"me/tokens/{b_tokens[0]['id']}").status_code == 404
    assert b.get("me").status_code == 200
