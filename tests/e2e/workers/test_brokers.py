"""What depends on the broker's own semantics, on Redis and on RabbitMQ (docs/workers.md, "Brokers").

The rest of tests/e2e/workers runs unchanged on both brokers (``manage.py test --broker
rabbitmq``); the tests here are about what differs: RabbitMQ's consumer timeout (checked at
worker start, and harmless to a job when it fires), publisher confirms (a publish the broker
refuses is seen), and AMQP heartbeats on the worker's connection.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import select

from app.broker import honours_consumer_timeout_argument
from app.config import Settings
from app.db import Database
from app.factory import create_app
from app.models import Job
from tests.e2e.workers.test_leases import INCLUDE, job_row, lease_queue, new_job, probe_events, probe_key
from tests.support import backends
from tests.support.factories import Factory
from tests.support.processes import drop_queue, spawned_worker
from tests.support.workers import wait_for

rabbitmq_only = pytest.mark.skipif(
    not backends.on_rabbitmq(), reason="RabbitMQ semantics: run with `manage.py test --broker rabbitmq`"
)

WARNING = "the broker's consumer_timeout"


def _vhost(settings: Settings) -> str:
    return urlsplit(settings.effective_broker_url).path.lstrip("/")


def _server_version(settings: Settings) -> str:
    with Connection(settings.effective_broker_url, connect_timeout=3) as conn:
        conn.connect()
        return str(conn.connection.server_properties["version"])


def test_the_worker_warns_at_start_when_rabbitmqs_consumer_timeout_is_not_above_the_longest_time_limit(
    worker: Celery, worker_log: Path, settings: Settings
) -> None:
    # The session worker declares nothing: on a RabbitMQ before 3.12 (this machine's is 3.10) that
    # means the broker's default, 30 min, below the 3,010 s hard limit of the batch jobs; a newer
    # one applies the worker's own consumer timeout. Redis has no consumer timeout to warn about.
    # (Which declarations and versions silence it: tests/unit/test_broker.py.)
    lines = [line for line in worker_log.read_text().splitlines() if WARNING in line]
    version = _server_version(settings) if backends.on_rabbitmq() else None
    if version is not None and not honours_consumer_timeout_argument(version):
        assert len(lines) == 1, lines
        # The worker read the broker's version from the handshake.
        assert f"RabbitMQ {version} applies only" in lines[0] and "(1800 s, RabbitMQ's default)" in lines[0]
        assert "consumer_timeout = 3600000" in lines[0] and "LATCHKEY_BROKER_CONSUMER_TIMEOUT_SECONDS" in lines[0]
    else:
        assert lines == []


@rabbitmq_only
def test_a_job_that_outlives_rabbitmqs_consumer_timeout_still_runs_once(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    """The broker takes the message back mid-run and delivers it again: the lease turns the copy away.

    A 6 s job under a 3 s lease (renewed), a 1.5 s consumer timeout on the worker's channel: the
    broker closes that channel while the job runs, the worker reconnects and receives the message
    again (redelivered) on its second thread. The job keeps running on the first delivery (the
    worker neither stops nor cancels it on a connection loss), the copy finds it held under a live
    lease and is skipped, and the job is finished once.
    """
    from tests.support.rabbitmq import short_channel_tick, shorten_consumer_timeout

    log = tmp_path / "w.log"
    with (
        lease_queue(settings, job_lease_seconds=3.0) as custom,
        probe_key(redis_url) as key,
        short_channel_tick(300),
        spawned_worker(custom, log, concurrency=2, include=INCLUDE) as (_proc, producer),
    ):
        job_id = new_job(db, "tests.lease_probe", {"key": key, "first_seconds": 6, "seconds": 0})
        assert shorten_consumer_timeout(_vhost(custom), custom.queue, 1500) == 1
        producer.send_task("tests.lease_probe", args=[job_id], task_id=job_id)
        wait_for(lambda: probe_events(redis_url, key))
        wait_for(lambda: "delivery acknowledgement on channel" in log.read_text(), timeout=20)

        def ended() -> list[str]:
            return [line for line in log.read_text().splitlines() if f"[{job_id}] succeeded in" in line]

        wait_for(lambda: len(ended()) >= 2, timeout=30)
        outcomes = ended()
        events = probe_events(redis_url, key)
    assert [(e["event"], e["attempt"], e["inside"]) for e in events] == [("enter", 1, 1), ("exit", 1, 0)]
    row = job_row(db, job_id)
    assert (row.status, row.attempts, row.result) == ("succeeded", 1, {"attempt": 1})
    # Two deliveries ended: the first ran the job, the redelivered copy was skipped.
    assert sorted("'skipped'" in x for x in outcomes) == [False, True]


@rabbitmq_only
def test_a_publish_rabbitmq_refuses_fails_the_job_with_broker_unavailable(
    settings: Settings, factory: Factory, db: Database
) -> None:
    """Without publisher confirms this publish would "succeed" and the message vanish, the job left queued."""
    from tests.support.rabbitmq import policy

    queue = f"latchkey-refused-{uuid.uuid4().hex[:10]}"
    web = create_app(settings.model_copy(update={"queue": queue}))
    try:
        operator = factory.user(operator=True)
        # The queue takes no message (a length limit of 0 that rejects the publish, as a full
        # queue with overflow=reject-publish does): the broker answers the publish with a nack.
        with policy(_vhost(settings), f"refuse-{queue}", f"^{queue}$", {"max-length": 0, "overflow": "reject-publish"}):
            resp = web.test_client().post("/api/v1/admin/jobs/ping", headers=operator.headers())
        assert resp.status_code == 503, resp.get_json()
        assert resp.get_json()["code"] == "broker_unavailable"
        with db.session() as s:
            job = s.scalars(select(Job)).one()
            assert (job.status, job.error_code) == ("failed", "broker_unavailable")
    finally:
        web.extensions["latchkey.db"].dispose()
        drop_queue(settings, queue)


@rabbitmq_only
def test_the_workers_rabbitmq_connection_keeps_amqp_heartbeats(worker: Celery, settings: Settings) -> None:
    from tests.support.rabbitmq import connection_heartbeats

    heartbeats = connection_heartbeats(_vhost(settings))
    # The worker's consuming connection negotiates the 60 s heartbeat (app/worker.py), so a
    # half-open connection is noticed by both ends; publishing connections need none.
    assert 60 in heartbeats, heartbeats
