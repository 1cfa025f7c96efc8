"""The secrets tasks called directly: ``secrets.reveal_value`` and ``secrets.replay_invalidations``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import func, select

from app.config import Settings
from app.db import Database, new_id
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import AuditEvent, CacheInvalidation, Job, JobStatus, Secret
from app.secrets import cachekeys, reveal
from app.secrets.sealing import generate_ephemeral
from tests.support.factories import CTX, Factory
from tests.unit.worker_support import run_task

VALUE = "reveal-me-" + "r" * 20


@pytest.fixture
def rclient(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


def _reveal_job(db: Database, factory: Factory, org: str) -> tuple[str, str, str, Any]:
    """A reveal job for a fresh secret, as the web tier queues it (its message parked); ids and the reply key."""
    admin = factory.user(org, "admin")
    secret_id = factory.secret(admin, org, value=VALUE)["id"]
    private_key, public_raw = generate_ephemeral()
    with db.session() as s:
        secret = s.get(Secret, secret_id)
        assert secret is not None
        org_id = secret.org_id
        job = jobs.create_job(
            s,
            CTX,
            org_id=org_id,
            kind=TaskName.REVEAL_VALUE,
            params={"secret_id": secret_id, "reply_public_key": reveal.encode_public_key(public_raw)},
            publish=False,  # the test calls the task itself
        )
        return job.id, org_id, secret_id, private_key


def test_a_reveal_seals_the_value_to_the_request_and_records_the_version(
    tasks_app: Celery, db: Database, factory: Factory, org: str, rclient: redis.Redis
) -> None:
    job_id, org_id, secret_id, private_key = _reveal_job(db, factory, org)
    key = reveal.reply_key(job_id)
    try:
        assert run_task(tasks_app, TaskName.REVEAL_VALUE, job_id) == "succeeded"
        (sealed,) = rclient.lrange(key, 0, -1)
        assert VALUE.encode() not in sealed
        assert reveal.open_reply(private_key, sealed, org_id, secret_id, job_id) == {"value": VALUE, "version": 1}
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and (job.status, job.result) == (JobStatus.SUCCEEDED, {"version": 1})
    finally:
        rclient.delete(key)


def test_a_secret_deleted_before_the_reveal_is_refused_with_a_reply(
    tasks_app: Celery, db: Database, factory: Factory, org: str, rclient: redis.Redis
) -> None:
    job_id, org_id, secret_id, private_key = _reveal_job(db, factory, org)
    with db.session() as s:
        row = s.get(Secret, secret_id)
        assert row is not None
        s.delete(row)
    key = reveal.reply_key(job_id)
    try:
        assert run_task(tasks_app, TaskName.REVEAL_VALUE, job_id) == "failed"
        (sealed,) = rclient.lrange(key, 0, -1)
        assert reveal.open_reply(private_key, sealed, org_id, secret_id, job_id) == {"error": "secret_not_found"}
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            assert (job.error_code, job.error_message) == ("secret_not_found", "the secret does not exist")
    finally:
        rclient.delete(key)


def test_a_second_delivery_of_a_reveal_serves_nothing_more(
    tasks_app: Celery, db: Database, factory: Factory, org: str, rclient: redis.Redis
) -> None:
    job_id, _org_id, _secret_id, _key = _reveal_job(db, factory, org)
    key = reveal.reply_key(job_id)
    try:
        assert run_task(tasks_app, TaskName.REVEAL_VALUE, job_id) == "succeeded"
        assert run_task(tasks_app, TaskName.REVEAL_VALUE, job_id) == "skipped"
        assert rclient.llen(key) == 1
        with db.session() as s:
            served = select(func.count()).where(AuditEvent.action == "secret.reveal_served")
            assert s.scalar(served) == 1
    finally:
        rclient.delete(key)


def test_replaying_the_outbox_applies_each_invalidation_once(
    tasks_app: Celery, db: Database, rclient: redis.Redis
) -> None:
    org_id, secret_id = new_id(), new_id()
    pointer = cachekeys.pointer(3, 7)
    with db.session() as s:
        s.add(CacheInvalidation(org_id=org_id, secret_id=secret_id, pointer=pointer))
    replay = tasks_app.tasks[TaskName.REPLAY_INVALIDATIONS]
    try:
        assert replay.apply().get() == 1
        assert rclient.get(cachekeys.key(org_id, secret_id)) == (pointer + "\n").encode()
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(CacheInvalidation)) == 0
        # Run again: the outbox is empty, nothing moves.
        assert replay.apply().get() == 0
        assert rclient.get(cachekeys.key(org_id, secret_id)) == (pointer + "\n").encode()
    finally:
        rclient.delete(cachekeys.key(org_id, secret_id))
