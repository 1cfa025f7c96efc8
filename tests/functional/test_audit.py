"""The audit log: every mutation recorded without values, and a chain that detects tampering."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import delete, select, update

from app.audit import service as audit
from app.models import AuditEvent, AuditHead, Org
from tests.support.factories import CTX, Caller, Factory


def _org_id(db: Any, slug: str) -> str:
    with db.session() as s:
        return s.scalars(select(Org.id).where(Org.slug == slug)).one()


def test_secret_mutations_are_audited_with_actor_request_and_no_value(
    admin: Caller, org: str, factory: Factory
) -> None:
    resp = admin.post(
        f"orgs/{org}/secrets",
        json={"name": "AUD", "value": "audit-value-xyz"},
        headers={"X-Request-ID": "req-create-1"},
    )
    sid = resp.get_json()["id"]
    admin.patch(
        f"orgs/{org}/secrets/{sid}",
        json={"value": "audit-value-2", "description": "d"},
        headers={"X-Request-ID": "req-update-1"},
    )
    admin.delete(f"orgs/{org}/secrets/{sid}", headers={"X-Request-ID": "req-delete-1"})

    events = admin.get(f"orgs/{org}/audit-events?target_type=secret").get_json()["items"]
    assert [e["action"] for e in events] == ["secret.delete", "secret.update", "secret.create"]
    by_action = {e["action"]: e for e in events}
    create = by_action["secret.create"]
    assert create["actor"] == {"type": "user", "id": admin.user_id}
    assert create["target"] == {"type": "secret", "id": sid}
    assert create["request_id"] == "req-create-1"
    assert create["ip"] == "127.0.0.1"
    assert create["details"]["name"] == "AUD" and create["details"]["version"] == 1
    assert by_action["secret.update"]["details"]["changed"] == ["description", "value"]
    assert by_action["secret.update"]["details"]["version"] == 2
    assert by_action["secret.delete"]["request_id"] == "req-delete-1"
    text = str(events)
    assert "audit-value" not in text


def test_membership_and_token_changes_are_audited(admin: Caller, org: str, factory: Factory, db: Any) -> None:
    newcomer = factory.user()
    # Adding a member is an invitation; the membership is created (and audited) when it is accepted.
    invited = admin.post(f"orgs/{org}/members", json={"email": newcomer.email, "role": "member"})
    assert invited.status_code == 202
    assert newcomer.post("invitations/accept", json={"token": invited.get_json()["token"]}).status_code == 200
    assert admin.patch(f"orgs/{org}/members/{newcomer.user_id}", json={"role": "admin"}).status_code == 200
    assert admin.delete(f"orgs/{org}/members/{newcomer.user_id}").status_code == 204
    actions = [
        e["action"]
        for e in admin.get(f"orgs/{org}/audit-events?target_type=membership&target_id={newcomer.user_id}").get_json()[
            "items"
        ]
    ]
    assert actions == ["membership.delete", "membership.update", "membership.create"]

    created = admin.post("me/tokens", json={"name": "ci"})
    assert created.status_code == 201 and created.get_json()["token"].startswith("lk_")
    assert admin.delete(f"me/tokens/{created.get_json()['id']}").status_code == 204
    with db.session() as s:
        token_events = s.scalars(
            select(AuditEvent).where(AuditEvent.target_type == "api_token").order_by(AuditEvent.seq)
        ).all()
        assert [e.action for e in token_events][-2:] == ["token.create", "token.revoke"]
        assert all(e.chain == audit.INSTANCE_CHAIN for e in token_events)
        assert created.get_json()["token"] not in str([e.details for e in token_events])


def test_filters_and_pagination(admin: Caller, org: str, factory: Factory) -> None:
    ids = [factory.secret(admin, org, name=f"F{i}")["id"] for i in range(5)]
    only = admin.get(f"orgs/{org}/audit-events?target_id={ids[2]}").get_json()["items"]
    assert [(e["action"], e["target"]["id"]) for e in only] == [("secret.create", ids[2])]
    assert admin.get(f"orgs/{org}/audit-events?action=secret.delete").get_json()["items"] == []
    assert admin.get(f"orgs/{org}/audit-events?since=2999-01-01T00:00:00Z").get_json()["items"] == []
    assert len(admin.get(f"orgs/{org}/audit-events?since=2000-01-01T00:00:00Z").get_json()["items"]) >= 5
    seqs, cursor = [], None
    while True:
        page = admin.get(f"orgs/{org}/audit-events?limit=2" + (f"&cursor={cursor}" if cursor else "")).get_json()
        seqs += [e["seq"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seqs == sorted(seqs, reverse=True) and len(seqs) == len(set(seqs)) >= 6
    assert admin.get(f"orgs/{org}/audit-events?since=yesterday").status_code == 422


def test_untouched_chain_verifies(admin: Caller, org: str, factory: Factory, db: Any) -> None:
    for i in range(3):
        factory.secret(admin, org, name=f"OK{i}")
    with db.session() as s:
        report = audit.verify_chain(s, _org_id(db, org))
    assert report.ok and report.events >= 4


def test_edited_event_is_detected(admin: Caller, org: str, factory: Factory, db: Any) -> None:
    factory.secret(admin, org, name="E1")
    factory.secret(admin, org, name="E2")
    org_id = _org_id(db, org)
    with db.session() as s:
        s.execute(
            update(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.seq == 2).values(details={"name": "FORGED"})
        )
    with db.session() as s:
        report = audit.verify_chain(s, org_id)
    assert not report.ok
    assert any("seq 2" in p and "edited" in p for p in report.problems)


def test_edited_hash_breaks_the_link_to_the_next_event(admin: Caller, org: str, factory: Factory, db: Any) -> None:
    factory.secret(admin, org, name="L1")
    factory.secret(admin, org, name="L2")
    org_id = _org_id(db, org)
    with db.session() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.seq == 2)).one()
        ev.actor_id = "someone-else"
        ev.hash = audit.compute_hash(ev)  # a forger recomputing this event's hash...
    with db.session() as s:
        report = audit.verify_chain(s, org_id)
    assert any("seq 3" in p and "does not link" in p for p in report.problems)  # ...still breaks the next link


def test_deleted_events_are_detected(admin: Caller, org: str, factory: Factory, db: Any) -> None:
    for i in range(3):
        factory.secret(admin, org, name=f"D{i}")
    org_id = _org_id(db, org)
    with db.session() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.seq == 2))
    with db.session() as s:
        middle = audit.verify_chain(s, org_id)
    assert any("missing" in p for p in middle.problems)
    with db.session() as s:
        last = s.scalars(
            select(AuditEvent.seq).where(AuditEvent.chain == org_id).order_by(AuditEvent.seq.desc())
        ).first()
        s.execute(delete(AuditEvent).where(AuditEvent.chain == org_id, AuditEvent.seq == last))
    with db.session() as s:
        tail = audit.verify_chain(s, org_id)
    assert any("head is at seq" in p for p in tail.problems)


def test_concurrent_appends_never_fork_the_chain(admin: Caller, org: str, db: Any) -> None:
    def create(i: int) -> int:
        return admin.post(f"orgs/{org}/secrets", json={"name": f"C{i}", "value": "v"}).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        assert list(pool.map(create, range(24))) == [201] * 24
    org_id = _org_id(db, org)
    with db.session() as s:
        report = audit.verify_chain(s, org_id)
        head = s.get(AuditHead, org_id)
    assert report.ok, report.problems
    assert head is not None and head.seq == report.events == 26  # org.create, the admin membership, 24 creates


def test_parallel_instance_jobs_each_get_one_event_on_an_unforked_instance_chain(factory: Factory, db: Any) -> None:
    # Every instance job (an operator's ping) appends to the one instance chain: its head is the
    # hottest row of the audit log, locked, read and moved by two statements per request.
    operator = factory.user(operator=True)
    with db.session() as s:
        before = audit.verify_chain(s, audit.INSTANCE_CHAIN).events

    def ping(_i: int) -> str:
        resp = operator.post("admin/jobs/ping")
        assert resp.status_code == 202, resp.get_json()
        job_id: str = resp.get_json()["job"]["id"]
        return job_id

    with ThreadPoolExecutor(max_workers=12) as pool:
        job_ids = list(pool.map(ping, range(36)))
    with db.session() as s:
        report = audit.verify_chain(s, audit.INSTANCE_CHAIN)
        head = s.get(AuditHead, audit.INSTANCE_CHAIN)
        created = s.scalars(
            select(AuditEvent.target_id).where(
                AuditEvent.chain == audit.INSTANCE_CHAIN, AuditEvent.action == "job.create"
            )
        ).all()
    assert report.ok, report.problems
    assert report.events == before + 36 and head is not None and head.seq == report.events
    assert sorted(created) == sorted(job_ids)


def test_a_batch_over_several_chains_appends_to_each_in_order(factory: Factory, db: Any) -> None:
    slugs = [factory.org() for _ in range(3)]
    org_ids = [_org_id(db, slug) for slug in slugs]
    entries = [audit.Entry("batch.step", org_id, "org", org_id, {"n": n}) for n in range(2) for org_id in org_ids]
    with db.session() as s:
        assert audit.record_many(s, CTX, [*entries, audit.Entry("batch.done", None)]) == 7
    with db.session() as s:
        for org_id in org_ids:
            report = audit.verify_chain(s, org_id)
            assert report.ok and report.events == 3, report.problems  # org.create, then the batch's two
            steps = s.scalars(
                select(AuditEvent.details)
                .where(AuditEvent.chain == org_id, AuditEvent.action == "batch.step")
                .order_by(AuditEvent.seq)
            ).all()
            assert steps == [{"n": 0}, {"n": 1}]
        assert audit.verify_chain(s, audit.INSTANCE_CHAIN).ok
