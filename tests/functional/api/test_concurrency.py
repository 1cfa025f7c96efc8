"""Concurrent edits: no lost update, and If-Match races lose cleanly with 412.

Runs on PostgreSQL when it is reachable (row locks) and on SQLite otherwise (writer lock).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from app.audit import service as audit
from app.models import AuditEvent, Secret
from app.secrets.sealing import open_sealed, secret_context
from tests.support.factories import Caller, Factory

N = 20


def _parallel(n: int, fn: Any) -> list[Any]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(fn, range(n)))


def test_20_parallel_value_patches_end_at_version_21(factory: Factory, db: Any, keyring: Any) -> None:
    org = factory.org("race")
    admin: Caller = factory.user(org, "admin")
    sid = factory.secret(admin, org, value="v0")["id"]

    responses = _parallel(N, lambda i: admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": f"value-{i}"}))

    assert [r.status_code for r in responses] == [200] * N
    versions = sorted(r.get_json()["version"] for r in responses)
    assert versions == list(range(2, N + 2))  # every edit got its own version: none was lost
    with db.session() as s:
        row = s.get(Secret, sid)
        assert row is not None and row.version == N + 1 and row.ciphertext is not None
        # The stored value is the one written by the request that got the last version.
        winner = next(i for i, r in enumerate(responses) if r.get_json()["version"] == N + 1)
        plain = open_sealed(keyring, row.ciphertext, secret_context(row.org_id, sid, N + 1)).decode()
        assert plain == f"value-{winner}"
        updates = s.scalars(select(AuditEvent).where(AuditEvent.action == "secret.update")).all()
        assert sorted(e.details["previous_version"] for e in updates) == list(range(1, N + 1))
        assert audit.verify_chain(s, row.org_id).ok


def test_if_match_race_has_exactly_one_winner(factory: Factory, db: Any) -> None:
    org = factory.org("ifmatch")
    admin = factory.user(org, "admin")
    sid = factory.secret(admin, org)["id"]

    responses = _parallel(
        10, lambda i: admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": f"v{i}"}, headers={"If-Match": '"1"'})
    )

    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [412] * 9
    assert all(r.get_json()["code"] == "version_mismatch" for r in responses if r.status_code == 412)
    with db.session() as s:
        row = s.get(Secret, sid)
        assert row is not None and row.version == 2


def test_parallel_creates_with_one_name_make_one_secret(factory: Factory, db: Any) -> None:
    org = factory.org("samename")
    admin = factory.user(org, "admin")
    responses = _parallel(8, lambda i: admin.post(f"orgs/{org}/secrets", json={"name": "ONLY_ONE", "value": "v"}))
    assert sorted(r.status_code for r in responses) == [201] + [409] * 7
    with db.session() as s:
        assert len(s.scalars(select(Secret).where(Secret.name == "ONLY_ONE")).all()) == 1
        org_id = s.scalars(select(Secret.org_id)).one()
        assert audit.verify_chain(s, org_id).ok


def test_parallel_requests_with_one_idempotency_key_create_once(factory: Factory, db: Any) -> None:
    org = factory.org("idem")
    admin = factory.user(org, "admin")
    body = {"name": "ONCE", "value": "v"}
    responses = _parallel(
        6, lambda i: admin.post(f"orgs/{org}/secrets", json=body, headers={"Idempotency-Key": "race-key"})
    )
    created = {r.get_json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == 1
    # Losers either replay the winner's answer or are told to retry; none creates a second secret.
    assert all(r.status_code in (201, 409) for r in responses)
    with db.session() as s:
        assert len(s.scalars(select(Secret).where(Secret.name == "ONCE")).all()) == 1
