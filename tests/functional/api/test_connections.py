"""MCP connections through the API: who may connect and disconnect, across users and roles; auth config refusals."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from app.db import Database, new_id, utcnow
from app.identity import service as identity
from app.jobs.names import TaskName
from app.models import ConnectionStatus, Job, JobStatus, McpConnection, McpServer, Secret
from app.models.connections import user_subject
from tests.support.factories import Caller, Factory
from tests.support.workers import wait_for


def _server(db: Database, slug: str, scope: str = "user", url: str = "https://oauth.test/mcp") -> str:
    with db.session() as s:
        server = McpServer(
            id=new_id(),
            org_id=identity.get_org(s, slug).id,
            name="OAuth",
            url=url,
            auth_type="oauth",
            connection_scope=scope,
        )
        s.add(server)
        return server.id


def _connected(db: Database, server_id: str, caller: Caller, *, with_secret: bool = False) -> str:
    """A connected row for ``caller`` (and, when asked, a token secret of kind connection)."""
    with db.session() as s:
        server = s.get(McpServer, server_id)
        assert server is not None
        secret_id = None
        if with_secret:
            secret_id = new_id()
            s.add(
                Secret(
                    id=secret_id,
                    org_id=server.org_id,
                    name=f"~connection:{secret_id}",
                    kind="connection",
                    ciphertext=b"sealed-elsewhere",
                    key_id="k",
                    version=1,
                )
            )
            s.flush()
        row = McpConnection(
            id=new_id(),
            org_id=server.org_id,
            mcp_server_id=server_id,
            subject=user_subject(caller.user_id),
            user_id=caller.user_id,
            status=ConnectionStatus.CONNECTED,
            secret_id=secret_id,
            scopes=["tools:read"],
            wanted_scopes=[],
            connected_at=utcnow(),
        )
        s.add(row)
        return secret_id or row.id


def _problem(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.get_json()
    assert resp.content_type == "application/problem+json" and resp.get_json()["code"] == code


def test_one_users_connection_is_never_anothers(factory: Factory, db: Database, org: str) -> None:
    alice, bob = factory.user(org, "member"), factory.user(org, "member")
    server_id = _server(db, org)
    _connected(db, server_id, alice)
    mine = alice.get(f"orgs/{org}/mcp-servers/{server_id}/connection").get_json()
    theirs = bob.get(f"orgs/{org}/mcp-servers/{server_id}/connection").get_json()
    assert (mine["status"], mine["scopes"], mine["scope"]) == ("connected", ["tools:read"], "user")
    assert (theirs["status"], theirs["scopes"]) == ("auth_required", [])
    assert bob.get(f"orgs/{org}/mcp-servers/{server_id}").get_json()["connection"]["status"] == "auth_required"
    # Bob's disconnect is about Bob's connection: there is none, and Alice's is untouched.
    _problem(bob.delete(f"orgs/{org}/mcp-servers/{server_id}/connection"), 404, "not_found")
    assert alice.get(f"orgs/{org}/mcp-servers/{server_id}/connection").get_json()["status"] == "connected"
    assert alice.delete(f"orgs/{org}/mcp-servers/{server_id}/connection").status_code == 204
    # Hers is marked revoking, for the worker that revokes and deletes it. Depending on the test
    # order, this session's worker process may be running and may already have done so: then the
    # row is gone because its revoke job ran, never for another reason.
    with db.session() as s:
        row = s.scalar(select(McpConnection).where(McpConnection.mcp_server_id == server_id))
        status = None if row is None else row.status
    if status is None:
        wait_for(lambda: _revoke_job_status(db, org) == JobStatus.SUCCEEDED)
    else:
        assert status == ConnectionStatus.REVOKING
        assert _revoke_job_status(db, org) is not None


def _revoke_job_status(db: Database, slug: str) -> str | None:
    with db.session() as s:
        org_id = identity.get_org(s, slug).id
        return s.scalar(select(Job.status).where(Job.org_id == org_id, Job.kind == TaskName.REVOKE_CONNECTION))


def test_an_org_connection_is_made_and_ended_by_admins_only(factory: Factory, db: Database, org: str) -> None:
    admin, member = factory.user(org, "admin"), factory.user(org, "member")
    server_id = _server(db, org, scope="org")
    _problem(member.post(f"orgs/{org}/mcp-servers/{server_id}/connect"), 403, "forbidden")
    _problem(member.delete(f"orgs/{org}/mcp-servers/{server_id}/connection"), 403, "forbidden")
    # Members still see the org connection their runs use.
    assert member.get(f"orgs/{org}/mcp-servers/{server_id}/connection").get_json()["scope"] == "org"
    _problem(admin.delete(f"orgs/{org}/mcp-servers/{server_id}/connection"), 404, "not_found")


def test_a_server_without_oauth_has_no_connection(factory: Factory, org: str) -> None:
    admin = factory.user(org, "admin")
    created = admin.post(f"orgs/{org}/mcp-servers", json={"name": "Plain", "url": "https://plain.test/mcp"})
    server_id = created.get_json()["id"]
    assert created.get_json()["auth"] == {
        "type": "none",
        "scope": "org",
        "client_id": None,
        "client_secret_ref": None,
        "token_endpoint_auth_method": None,
        "scopes": None,
    }
    assert created.get_json()["connection"] is None
    _problem(admin.post(f"orgs/{org}/mcp-servers/{server_id}/connect"), 409, "oauth_not_configured")
    _problem(admin.get(f"orgs/{org}/mcp-servers/{server_id}/connection"), 409, "oauth_not_configured")
    _problem(admin.delete(f"orgs/{org}/mcp-servers/{server_id}/connection"), 409, "oauth_not_configured")


def test_the_callback_refuses_unknown_states_and_bad_bodies(factory: Factory, org: str) -> None:
    caller = factory.user(org, "member")
    _problem(caller.post("oauth/callback", json={"state": "nope", "code": "c"}), 404, "invalid_state")
    _problem(caller.post("oauth/callback", json={"state": "nope"}), 422, "validation_error")
    _problem(caller.post("oauth/callback", json={"state": "", "code": "c"}), 422, "validation_error")
    assert caller.client.post("/api/v1/oauth/callback", json={"state": "s", "code": "c"}).status_code == 401


def test_auth_settings_are_checked(factory: Factory, db: Database, org: str) -> None:
    admin, member = factory.user(org, "admin"), factory.user(org, "member")
    other = factory.org()
    other_admin = factory.user(other, "admin")
    secret = factory.secret(admin, org, value="client-secret-" + "c" * 20)["id"]
    foreign = factory.secret(other_admin, other, value="foreign-" + "f" * 20)["id"]

    def create(caller: Caller, auth: dict[str, Any], **extra: Any) -> Any:
        body = {"name": "O", "url": "https://o.test/mcp", "auth": auth, **extra}
        return caller.post(f"orgs/{org}/mcp-servers", json=body)

    _problem(create(admin, {"type": "oauth"}, secret_ref=secret), 422, "validation_error")
    _problem(create(admin, {"type": "oauth_client_credentials", "client_id": "c"}), 422, "validation_error")
    _problem(create(admin, {"type": "oauth", "client_secret_ref": secret}), 422, "validation_error")
    _problem(create(admin, {"type": "oauth", "scope": "team"}), 422, "validation_error")
    _problem(create(admin, {"type": "oauth", "scopes": ["has space"]}), 422, "validation_error")
    _problem(create(member, {"type": "oauth", "client_id": "c", "client_secret_ref": secret}), 403, "forbidden")
    _problem(create(admin, {"type": "oauth", "client_id": "c", "client_secret_ref": foreign}), 422, "validation_error")
    headers = [{"name": "Authorization", "template": "Bearer {{secret}}", "secret_ref": secret}]
    _problem(create(admin, {"type": "oauth"}, headers=headers), 422, "validation_error")
    made = create(member, {"type": "oauth", "scope": "user", "scopes": ["tools:read"]})
    assert made.status_code == 201, made.get_json()
    assert made.get_json()["auth"]["type"] == "oauth" and made.get_json()["auth"]["scopes"] == ["tools:read"]
    assert made.get_json()["connection"]["status"] == "auth_required"


def test_a_connections_token_secret_cannot_be_bound_listed_or_revealed(
    factory: Factory, db: Database, org: str
) -> None:
    """A member's way to another user's token would be to bind its secret to a server of their own."""
    admin, alice = factory.user(org, "admin"), factory.user(org, "member")
    server_id = _server(db, org)
    token_secret = _connected(db, server_id, alice, with_secret=True)
    body = {
        "name": "Mine",
        "url": "https://attacker.test/mcp",
        "headers": [{"name": "X-Token", "template": "{{secret}}", "secret_ref": token_secret}],
    }
    _problem(admin.post(f"orgs/{org}/mcp-servers", json=body), 422, "validation_error")
    _problem(
        admin.post(
            f"orgs/{org}/mcp-servers", json={"name": "M", "url": "https://a.test/mcp", "secret_ref": token_secret}
        ),
        422,
        "validation_error",
    )
    assert token_secret not in {item["id"] for item in admin.get(f"orgs/{org}/secrets").get_json()["items"]}
    _problem(admin.get(f"orgs/{org}/secrets/{token_secret}"), 404, "not_found")
    _problem(admin.patch(f"orgs/{org}/secrets/{token_secret}", json={"value": "x"}), 404, "not_found")
    _problem(admin.delete(f"orgs/{org}/secrets/{token_secret}"), 404, "not_found")


def test_connect_without_a_worker_answers_503_and_fails_its_job(settings: Any, db: Database) -> None:
    import uuid

    from app.factory import create_app
    from app.models import Job
    from tests.support.processes import drop_queue

    # A queue nobody consumes, and a short wait: no worker prepares the authorization.
    quick = settings.model_copy(
        update={
            "queue": f"latchkey-nobody-{uuid.uuid4().hex[:8]}",
            "reveal_timeout_seconds": 0.2,
            "mcp_timeout_seconds": 0.1,
        }
    )
    app = create_app(quick)
    try:
        factory = Factory(db, app.test_client())
        org = factory.org()
        admin = factory.user(org, "admin")
        server_id = _server(db, org, scope="org")
        _problem(admin.post(f"orgs/{org}/mcp-servers/{server_id}/connect"), 503, "worker_unavailable")
        with db.session() as s:
            job = s.scalar(select(Job).where(Job.kind == "mcp.prepare_connection"))
            assert job is not None and (job.status, job.error_code) == ("failed", "worker_unavailable")
            assert "reply_public_key" in job.params and all("state" not in k for k in job.params)
    finally:
        app.extensions["latchkey.db"].dispose()
        drop_queue(settings, quick.queue)


def test_the_client_id_metadata_document_is_served(client: Any, settings: Any) -> None:
    resp = client.get("/oauth/client-metadata.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    doc = resp.get_json()
    public = settings.public_url.rstrip("/")
    assert doc["client_id"] == public + "/oauth/client-metadata.json"
    assert doc["redirect_uris"] == [public + "/oauth/callback"]
    assert doc["token_endpoint_auth_method"] == "none"
    assert set(doc["grant_types"]) == {"authorization_code", "refresh_token"}
