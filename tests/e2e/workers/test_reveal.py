"""Reveal end to end: API -> real broker -> real worker -> sealed reply -> API.

The web tier never opens stored ciphertext: the worker seals the value to a key that lives
only in the request, and neither the jobs table nor Redis ever holds it in clear.
"""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from flask import Flask
from sqlalchemy import func, select, update

from app.config import Settings
from app.context import Actor, RequestContext
from app.db import Database, utcnow
from app.factory import create_app
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import AuditEvent, Job
from app.secrets import reveal
from app.secrets.sealing import CiphertextError, generate_ephemeral
from tests.support import backends
from tests.support.factories import CTX, Caller, Factory, drop_queued
from tests.support.leaks import dump_database, dump_redis, find_leaks
from tests.support.processes import drop_queue
from tests.support.workers import extra_worker, wait_for

CANARY = "lk-canary-reveal-7c1f0e9b2d4a-ünïcødé"


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _reveal(caller: Caller, org: str, secret_id: str) -> Any:
    return caller.post(f"orgs/{org}/secrets/{secret_id}/reveal")


def _job_count(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def _reveal_jobs(db: Database) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).where(Job.kind == TaskName.REVEAL_VALUE).order_by(Job.created_at)))


def _finished(db: Database, job_id: str) -> Job:
    def done() -> Job | None:
        with db.session() as s:
            job = s.get(Job, job_id)
            return job if job is not None and job.status in ("succeeded", "failed") else None

    job: Job = wait_for(done)
    return job


def _side_app(settings: Settings, **update: Any) -> Flask:
    return create_app(settings.model_copy(update=update))


def _drop_side_app(side: Flask) -> None:
    side.extensions["latchkey.db"].dispose()
    side.extensions["latchkey.redis"].close()


# The happy path --------------------------------------------------------------------------------


def test_admin_gets_the_exact_value_and_version(worker: Celery, factory: Factory, org: str, admin: Caller) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    resp = _reveal(admin, org, secret["id"])
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"value": CANARY, "version": 1}
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Pragma"] == "no-cache"
    assert resp.mimetype == "application/json"


def test_after_an_edit_the_new_value_is_revealed(worker: Celery, factory: Factory, org: str, admin: Caller) -> None:
    secret = factory.secret(admin, org, value="the-first-value")
    assert _reveal(admin, org, secret["id"]).get_json() == {"value": "the-first-value", "version": 1}
    assert admin.patch(f"orgs/{org}/secrets/{secret['id']}", json={"value": "the-second-value"}).status_code == 200
    assert _reveal(admin, org, secret["id"]).get_json() == {"value": "the-second-value", "version": 2}
    # A metadata-only edit keeps the version and the value.
    assert admin.patch(f"orgs/{org}/secrets/{secret['id']}", json={"description": "d"}).status_code == 200
    assert _reveal(admin, org, secret["id"]).get_json() == {"value": "the-second-value", "version": 2}


def test_the_job_records_the_version_and_is_committed_once(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database, rclient: redis.Redis
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    assert _reveal(admin, org, secret["id"]).status_code == 200
    [row] = _reveal_jobs(db)
    job = _finished(db, row.id)
    assert job.status == "succeeded"
    assert job.result == {"version": 1}
    assert job.resolved_secrets == [{"secret_id": secret["id"], "version": 1}]
    assert set(job.params) == {"secret_id", "reply_public_key"}
    assert job.params["secret_id"] == secret["id"]
    # The reply was consumed: nothing waits in Redis.
    assert rclient.exists(reveal.reply_key(job.id)) == 0
    # The org sees the job like any other, without a value.
    seen = admin.get(f"orgs/{org}/jobs/{job.id}").get_json()
    assert (seen["kind"], seen["status"], seen["result"]) == ("secrets.reveal_value", "succeeded", {"version": 1})
    # Exactly one job.create and one secret.reveal, despite the handler committing mid-request.
    with db.session() as s:
        actions = [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq)) if e.org_id is not None]
    assert actions.count("job.create") == 1 and actions.count("secret.reveal") == 1


def test_the_reveal_is_audited_without_the_value(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    assert _reveal(admin, org, secret["id"]).status_code == 200
    [job] = _reveal_jobs(db)
    events = admin.get(f"orgs/{org}/audit-events", query_string={"action": "secret.reveal"}).get_json()["items"]
    assert len(events) == 1
    event = events[0]
    assert event["actor"] == {"type": "user", "id": admin.user_id}
    assert event["target"] == {"type": "secret", "id": secret["id"]}
    assert event["details"] == {"version": 1, "job_id": job.id}
    assert event["request_id"]
    with db.session() as s:
        rows = [repr((e.action, e.details)) for e in s.scalars(select(AuditEvent))]
    assert not find_leaks([("audit", "\n".join(rows))], [CANARY])


# Who may reveal what -----------------------------------------------------------------------------


def test_a_member_gets_403_and_no_job_is_created(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    member = factory.user(org, "member")
    before = _job_count(db)
    resp = _reveal(member, org, secret["id"])
    assert resp.status_code == 403 and resp.get_json()["code"] == "forbidden"
    assert CANARY not in resp.get_data(as_text=True)
    assert _job_count(db) == before


def test_another_orgs_secret_and_an_unknown_id_are_404(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    other = factory.org()
    other_admin = factory.user(other, "admin")
    foreign = factory.secret(other_admin, other, value=CANARY)
    before = _job_count(db)
    for secret_id in (foreign["id"], str(uuid.uuid4()), "no-such-secret"):
        resp = _reveal(admin, org, secret_id)
        assert resp.status_code == 404 and resp.get_json()["code"] == "not_found", secret_id
        assert CANARY not in resp.get_data(as_text=True)
    # Not a member of that org at all: 404 too, never 403.
    resp = _reveal(admin, other, foreign["id"])
    assert resp.status_code == 404
    assert _job_count(db) == before


def test_no_token_is_401(client: Any, factory: Factory, org: str, admin: Caller) -> None:
    secret = factory.secret(admin, org)
    resp = client.post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal")
    assert resp.status_code == 401


# When things go wrong ---------------------------------------------------------------------------


def test_no_worker_answers_503_worker_unavailable_within_the_timeout(
    settings: Settings, factory: Factory, org: str, admin: Caller, db: Database, rclient: redis.Redis
) -> None:
    queue = f"nobody-listens-{uuid.uuid4().hex}"
    side = _side_app(settings, queue=queue, reveal_timeout_seconds=1.0)
    try:
        secret = factory.secret(admin, org, value=CANARY)
        start = time.monotonic()
        resp = side.test_client().post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal", headers=admin.headers())
        elapsed = time.monotonic() - start
        assert resp.status_code == 503, resp.get_json()
        assert resp.get_json()["code"] == "worker_unavailable"
        assert CANARY not in resp.get_data(as_text=True)
        assert 0.9 <= elapsed < 3.0, elapsed
        [job] = _reveal_jobs(db)
        assert (job.status, job.error_code) == ("failed", "worker_unavailable")
        with db.session() as s:
            assert s.scalar(select(func.count()).where(AuditEvent.action == "secret.reveal")) == 0
    finally:
        _drop_side_app(side)
        drop_queue(settings, queue)


def test_over_the_rate_limit_is_429_with_retry_after(
    worker: Celery, settings: Settings, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    side = _side_app(settings, reveal_rate_limit=2)
    try:
        secret = factory.secret(admin, org, value=CANARY)
        # Stay inside one fixed window (each reveal takes milliseconds).
        left = reveal.RATE_WINDOW_SECONDS - time.time() % reveal.RATE_WINDOW_SECONDS
        if left < 5:
            time.sleep(left + 0.05)
        side_client = side.test_client()
        path = f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal"
        for _ in range(2):
            ok = side_client.post(path, headers=admin.headers())
            assert ok.status_code == 200, ok.get_json()
        limited = side_client.post(path, headers=admin.headers())
        assert limited.status_code == 429
        assert limited.get_json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= reveal.RATE_WINDOW_SECONDS
        assert CANARY not in limited.get_data(as_text=True)
        # A refused reveal queues nothing; the limit is per user, so another admin still may.
        assert len(_reveal_jobs(db)) == 2
        other_admin = factory.user(org, "admin")
        assert side_client.post(path, headers=other_admin.headers()).status_code == 200
    finally:
        _drop_side_app(side)


def test_rate_limiter_down_fails_closed(
    settings: Settings, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    side = _side_app(settings, redis_url="redis://127.0.0.1:1/0", broker_url=settings.effective_broker_url)
    try:
        secret = factory.secret(admin, org, value=CANARY)
        resp = side.test_client().post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal", headers=admin.headers())
        assert resp.status_code == 503
        assert resp.get_json()["code"] == "unavailable"
        assert _reveal_jobs(db) == []
    finally:
        _drop_side_app(side)


def test_broker_outage_is_503_broker_unavailable(
    settings: Settings, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    side = _side_app(settings, broker_url=backends.closed_broker_url())
    try:
        secret = factory.secret(admin, org, value=CANARY)
        resp = side.test_client().post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal", headers=admin.headers())
        assert resp.status_code == 503
        assert resp.get_json()["code"] == "broker_unavailable"
        [job] = _reveal_jobs(db)
        assert (job.status, job.error_code) == ("failed", "broker_unavailable")
    finally:
        _drop_side_app(side)


# Nothing in clear at rest -------------------------------------------------------------------------


def test_no_plaintext_in_the_jobs_table_or_redis_after_a_reveal(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database, settings: Settings
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    resp = _reveal(admin, org, secret["id"])
    assert resp.get_json()["value"] == CANARY  # the scan below must be looking for something real
    [job] = _reveal_jobs(db)
    _finished(db, job.id)
    assert db.engine is not None
    haystacks = [*dump_database(db.engine), *dump_redis(settings.redis_url)]
    assert any(where == "table jobs" and job.id in text for where, text in haystacks)
    assert not find_leaks(haystacks, [CANARY])


# The worker task on its own -----------------------------------------------------------------------


def _manual_job(db: Database, org_id: str, secret_id: str, public_raw: bytes) -> str:
    with db.session() as s:
        job = jobs.create_job(
            s,
            CTX,
            org_id=org_id,
            kind=TaskName.REVEAL_VALUE,
            params={"secret_id": secret_id, "reply_public_key": reveal.encode_public_key(public_raw)},
        )
        drop_queued(s)
        return job.id


def _org_id(db: Database, secret_id: str) -> str:
    from app.models import Secret

    with db.session() as s:
        row = s.get(Secret, secret_id)
        assert row is not None
        return row.org_id


def test_running_the_task_twice_for_one_job_is_harmless(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database, rclient: redis.Redis
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    org_id = _org_id(db, secret["id"])
    private_key, public_raw = generate_ephemeral()
    job_id = _manual_job(db, org_id, secret["id"], public_raw)
    key = reveal.reply_key(job_id)
    try:
        assert worker.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20) == "succeeded"
        # A redelivery of a finished job does nothing.
        assert worker.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20) == "skipped"
        assert rclient.llen(key) == 1
        # A redelivery after its worker died mid-run (lease lapsed): runs again, pushes a second sealed reply.
        with db.session() as s:
            lapsed = utcnow() - timedelta(seconds=1)
            s.execute(update(Job).where(Job.id == job_id).values(status="running", lease_expires_at=lapsed))
        assert worker.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20) == "succeeded"
        replies = rclient.lrange(key, 0, -1)
        assert len(replies) == 2
        assert 0 < rclient.ttl(key) <= reveal.REPLY_TTL_SECONDS
        for sealed in replies:
            assert CANARY.encode() not in sealed
            assert reveal.open_reply(private_key, sealed, org_id, secret["id"], job_id) == {
                "value": CANARY,
                "version": 1,
            }
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            assert (job.status, job.result, job.attempts) == ("succeeded", {"version": 1}, 2)
            assert job.resolved_secrets == [{"secret_id": secret["id"], "version": 1}]
    finally:
        rclient.delete(key)


def test_the_worker_answers_not_found_at_once_for_a_missing_secret(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database, rclient: redis.Redis
) -> None:
    secret = factory.secret(admin, org)
    org_id = _org_id(db, secret["id"])
    other = factory.org()
    foreign = factory.secret(factory.user(other, "admin"), other, value=CANARY)
    for missing in (str(uuid.uuid4()), foreign["id"]):
        private_key, public_raw = generate_ephemeral()
        job_id = _manual_job(db, org_id, missing, public_raw)
        key = reveal.reply_key(job_id)
        try:
            assert worker.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20) == "failed"
            [sealed] = rclient.lrange(key, 0, -1)
            assert reveal.open_reply(private_key, sealed, org_id, missing, job_id) == {"error": "secret_not_found"}
            with db.session() as s:
                job = s.get(Job, job_id)
                assert job is not None and (job.status, job.error_code) == ("failed", "secret_not_found")
                assert job.resolved_secrets is None
        finally:
            rclient.delete(key)


def test_a_job_with_a_bad_reply_key_fails_without_resolving(
    worker: Celery, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    with db.session() as s:
        job = jobs.create_job(
            s,
            CTX,
            org_id=_org_id(db, secret["id"]),
            kind=TaskName.REVEAL_VALUE,
            params={"secret_id": secret["id"], "reply_public_key": "not base64!"},
        )
        drop_queued(s)
        job_id = job.id
    assert worker.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20) == "failed"
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None and (row.error_code, row.resolved_secrets) == ("invalid_params", None)


# The reply envelope ----------------------------------------------------------------------------------


def test_a_reply_opens_only_for_its_own_request() -> None:
    private_key, public_raw = generate_ephemeral()
    other_key, _ = generate_ephemeral()
    public = reveal.encode_public_key(public_raw)
    sealed = reveal.seal_reply(public, "org-1", "sec-1", "job-1", {"value": CANARY, "version": 3})
    assert CANARY.encode() not in sealed
    assert reveal.open_reply(private_key, sealed, "org-1", "sec-1", "job-1") == {"value": CANARY, "version": 3}
    for org_id, secret_id, job_id in (
        ("org-2", "sec-1", "job-1"),
        ("org-1", "sec-2", "job-1"),
        ("org-1", "sec-1", "job-2"),
    ):
        with pytest.raises(CiphertextError):
            reveal.open_reply(private_key, sealed, org_id, secret_id, job_id)
    with pytest.raises(CiphertextError):
        reveal.open_reply(other_key, sealed, "org-1", "sec-1", "job-1")
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(CiphertextError):
        reveal.open_reply(private_key, bytes(tampered), "org-1", "sec-1", "job-1")
    with pytest.raises(ValueError, match="32 bytes"):
        reveal.decode_public_key(reveal.encode_public_key(b"short"))


# The worker's own controls, against a compromised web tier ------------------------------------------
#
# A compromised web tier holds the database and broker credentials: it can write reveal job rows
# and publish them, skipping every check of the API. These tests do exactly that (no API call,
# no web-side limiter) and show what the worker still enforces on its own.


def _forged_reveal(db: Database, org_id: str, secret_id: str, created_by: str | None) -> tuple[str, Any]:
    """A reveal job written straight into the jobs table, as a compromised web tier would."""
    private_key, public_raw = generate_ephemeral()
    with db.session() as s:
        job = jobs.create_job(
            s,
            RequestContext(Actor("user", created_by)),
            org_id=org_id,
            kind=TaskName.REVEAL_VALUE,
            params={"secret_id": secret_id, "reply_public_key": reveal.encode_public_key(public_raw)},
        )
        drop_queued(s)
        return job.id, private_key


def _run_forged(
    producer: Celery, db: Database, rclient: redis.Redis, org_id: str, secret_id: str, created_by: str | None
) -> tuple[Job, dict[str, Any]]:
    """Publish a forged reveal job; the finished row and the opened reply."""
    job_id, private_key = _forged_reveal(db, org_id, secret_id, created_by)
    producer.send_task(TaskName.REVEAL_VALUE, args=[job_id]).get(timeout=20)
    key = reveal.reply_key(job_id)
    try:
        [sealed] = rclient.lrange(key, 0, -1)
    finally:
        rclient.delete(key)
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        s.expunge(row)
    return row, reveal.open_reply(private_key, sealed, org_id, secret_id, job_id)


def _served(row: Job, reply: dict[str, Any]) -> bool:
    if row.status == "succeeded":
        assert reply == {"value": CANARY, "version": 1}
        return True
    return False


def _assert_refused(row: Job, reply: dict[str, Any], code: str) -> None:
    assert (row.status, row.error_code) == ("failed", code)
    assert reply["error"] == code and "value" not in reply
    # Refused before anything was resolved.
    assert row.resolved_secrets is None


def _inside_one_window(seconds: int) -> None:
    """Start a test far enough from a fixed-window boundary that its reveals all count in one."""
    left = seconds - time.time() % seconds
    if left < 10:
        time.sleep(left + 0.05)


def _secret_in_new_org(factory: Factory, db: Database) -> tuple[str, str]:
    org = factory.org()
    secret = factory.secret(factory.user(org, "admin"), org, value=CANARY)
    return _org_id(db, secret["id"]), secret["id"]


def test_the_worker_enforces_the_per_user_limit_on_jobs_it_did_not_see_queued(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org_id, secret_id = _secret_in_new_org(factory, db)
    _inside_one_window(900)
    with extra_worker(settings, reveal_limit_per_user=2) as (producer, _web):
        alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
        for _ in range(2):
            assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, alice))
        row, reply = _run_forged(producer, db, rclient, org_id, secret_id, alice)
        _assert_refused(row, reply, "rate_limited")
        assert 1 <= reply["retry_after"] <= 900
        assert CANARY not in repr(reply) and CANARY not in (row.error_message or "")
        # Another user of the same org still may; a refusal used up nobody's budget.
        assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, bob))
        assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, bob))
        # A forged row that names no user shares one bucket: leaving created_by empty is no way out.
        for _ in range(2):
            assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, None))
        _assert_refused(*_run_forged(producer, db, rclient, org_id, secret_id, None), "rate_limited")


def test_the_worker_enforces_the_per_org_limit_whatever_user_the_rows_name(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org_id, secret_id = _secret_in_new_org(factory, db)
    other_org_id, other_secret_id = _secret_in_new_org(factory, db)
    _inside_one_window(900)
    with extra_worker(settings, reveal_limit_per_org=3) as (producer, _web):
        # A compromised web tier forges a new user for every row: the per-user limit never binds.
        for _ in range(3):
            assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4())))
        _assert_refused(*_run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4())), "rate_limited")
        assert _served(*_run_forged(producer, db, rclient, other_org_id, other_secret_id, str(uuid.uuid4())))


def test_the_instance_limit_binds_in_the_worker_even_when_redis_is_reset(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    secrets_by_org = [_secret_in_new_org(factory, db) for _ in range(4)]
    # The worker counts in a Redis database of its own (LATCHKEY_WORKER_REDIS_URL).
    base, _, index = settings.redis_url.rpartition("/")
    worker_redis_url = f"{base}/{(int(index) + 1) % 16}"
    worker_redis = redis.Redis.from_url(worker_redis_url)
    _inside_one_window(900)
    try:
        with extra_worker(settings, reveal_limit_instance=2, worker_redis_url=worker_redis_url) as (producer, _web):
            queue = producer.conf.task_default_queue
            for org_id, secret_id in secrets_by_org[:2]:
                assert _served(*_run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4())))
            org_id, secret_id = secrets_by_org[2]
            _assert_refused(*_run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4())), "rate_limited")
            # The counts are in the worker's Redis, none in the shared one the web tier writes.
            assert list(rclient.scan_iter(match=f"lk:wrl:{queue}:*")) == []
            counted = list(worker_redis.scan_iter(match=f"lk:wrl:{queue}:reveal:instance:*"))
            assert len(counted) == 1
            # Whoever can write that Redis resets every count: each worker process still remembers.
            worker_redis.delete(*worker_redis.scan_iter(match=f"lk:wrl:{queue}:*"))
            org_id, secret_id = secrets_by_org[3]
            _assert_refused(*_run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4())), "rate_limited")
    finally:
        worker_redis.close()


def test_the_worker_refuses_every_reveal_when_reveal_is_disabled(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org_id, secret_id = _secret_in_new_org(factory, db)
    with extra_worker(settings, reveal_disabled=True) as (producer, _web):
        row, reply = _run_forged(producer, db, rclient, org_id, secret_id, str(uuid.uuid4()))
        _assert_refused(row, reply, "reveal_disabled")


def test_the_worker_refuses_reveals_of_a_disabled_org_and_the_api_answers_403(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org = factory.org()
    admin = factory.user(org, "admin")
    secret = factory.secret(admin, org, value=CANARY)
    org_id = _org_id(db, secret["id"])
    other_org_id, other_secret_id = _secret_in_new_org(factory, db)
    with extra_worker(settings, reveal_disabled_orgs=(org_id, "some-other-org-id")) as (producer, web):
        _assert_refused(*_run_forged(producer, db, rclient, org_id, secret["id"], admin.user_id), "reveal_disabled")
        assert _served(*_run_forged(producer, db, rclient, other_org_id, other_secret_id, None))
        # Through the API (the web tier's checks all pass): the worker's refusal is a 403.
        resp = web.test_client().post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal", headers=admin.headers())
        assert resp.status_code == 403, resp.get_json()
        assert resp.mimetype == "application/problem+json"
        assert resp.get_json()["code"] == "reveal_disabled"
        assert CANARY not in resp.get_data(as_text=True)


def test_the_api_answers_429_when_the_worker_limits_a_user(
    settings: Settings, factory: Factory, org: str, admin: Caller, db: Database
) -> None:
    secret = factory.secret(admin, org, value=CANARY)
    _inside_one_window(900)
    with extra_worker(settings, reveal_limit_per_user=1) as (_producer, web):
        client = web.test_client()
        path = f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal"
        assert client.post(path, headers=admin.headers()).get_json() == {"value": CANARY, "version": 1}
        limited = client.post(path, headers=admin.headers())
        assert limited.status_code == 429, limited.get_json()
        assert limited.get_json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 900
        assert CANARY not in limited.get_data(as_text=True)
        # The web tier records a reveal only when the worker served one.
        with db.session() as s:
            assert s.scalar(select(func.count()).where(AuditEvent.action == "secret.reveal")) == 1


def test_the_worker_refuses_reveals_when_it_cannot_count_them(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org = factory.org()
    admin = factory.user(org, "admin")
    secret = factory.secret(admin, org, value=CANARY)
    org_id = _org_id(db, secret["id"])
    # Fails closed: a worker whose limiter Redis is down serves nothing rather than serving unmetered.
    with extra_worker(settings, worker_redis_url="redis://127.0.0.1:1/0") as (producer, web):
        _assert_refused(*_run_forged(producer, db, rclient, org_id, secret["id"], None), "limiter_unavailable")
        resp = web.test_client().post(f"/api/v1/orgs/{org}/secrets/{secret['id']}/reveal", headers=admin.headers())
        assert resp.status_code == 503, resp.get_json()
        assert CANARY not in resp.get_data(as_text=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_worker_audits_and_counts_every_reveal_served_or_refused(
    settings: Settings, factory: Factory, db: Database, rclient: redis.Redis
) -> None:
    org_id, secret_id = _secret_in_new_org(factory, db)
    disabled_org_id, disabled_secret_id = _secret_in_new_org(factory, db)
    user = str(uuid.uuid4())
    port = _free_port()
    with extra_worker(settings, reveal_disabled_orgs=(disabled_org_id,), worker_metrics_port=port) as (producer, _w):
        served, _ = _run_forged(producer, db, rclient, org_id, secret_id, user)
        assert served.status == "succeeded"
        refused, _ = _run_forged(producer, db, rclient, disabled_org_id, disabled_secret_id, user)
        assert refused.status == "failed"
        missing = str(uuid.uuid4())
        gone, _ = _run_forged(producer, db, rclient, org_id, missing, user)
        assert gone.error_code == "secret_not_found"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            scraped = resp.read().decode()
    assert 'latchkey_worker_reveals_total{code="",outcome="served"} 1.0' in scraped
    assert 'latchkey_worker_reveals_total{code="reveal_disabled",outcome="refused"} 1.0' in scraped
    assert 'latchkey_worker_reveals_total{code="secret_not_found",outcome="refused"} 1.0' in scraped
    with db.session() as s:
        events = [
            (e.org_id, e.action, e.actor_type, e.target_id, e.details)
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action.like("secret.reveal_%")))
        ]
    expected = [
        (
            org_id,
            "secret.reveal_served",
            "worker",
            secret_id,
            {"job_id": served.id, "version": 1, "requested_by": user},
        ),
        (
            disabled_org_id,
            "secret.reveal_refused",
            "worker",
            disabled_secret_id,
            {"job_id": refused.id, "code": "reveal_disabled", "requested_by": user},
        ),
        (
            org_id,
            "secret.reveal_refused",
            "worker",
            missing,
            {"job_id": gone.id, "code": "secret_not_found", "requested_by": user},
        ),
    ]
    assert sorted(map(repr, events)) == sorted(map(repr, expected))
    assert CANARY not in repr(events)
