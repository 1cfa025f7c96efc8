"""Job leases on real worker processes over the real broker (issue #10 item 5, issue #14).

A running job is held by one claim until its lease lapses; the holder renews it; beat's
``jobs.sweep_leases`` re-queues (or, at the attempts cap, fails with ``worker_lost``) the jobs
of workers that died. The worker-side tasks of these tests are in tests/support/lease_tasks.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from celery import beat
from sqlalchemy import select

from app.config import Settings
from app.db import Database, utcnow
from app.factory import create_app
from app.jobs import service as jobs
from app.models import AgentRun, AuditEvent, Job
from app.tasks.runtime import HARD_GRACE_SECONDS, LONGEST_TIME_LIMIT, worker_context
from app.worker import make_celery
from tests.support import backends
from tests.support.factories import CTX, Factory, drop_queued
from tests.support.llm_server import LlmTestServer
from tests.support.processes import drop_queue, queued_headers, spawned_worker
from tests.support.workers import wait_for

INCLUDE = ["tests.support.lease_tasks"]
LEASE = 2.0


@contextmanager
def lease_queue(settings: Settings, **overrides: Any) -> Iterator[Settings]:
    """Settings with a queue of the test's own (no session worker consumes it) and a short lease."""
    custom = settings.model_copy(
        update={"queue": f"latchkey-lease-{uuid.uuid4().hex[:10]}", "job_lease_seconds": LEASE, **overrides}
    )
    try:
        yield custom
    finally:
        drop_queue(settings, custom.queue)


@contextmanager
def probe_key(redis_url: str) -> Iterator[str]:
    key = f"lk-test-lease:{uuid.uuid4().hex}"
    try:
        yield key
    finally:
        client = redis.Redis.from_url(redis_url)
        client.delete(key, f"{key}:inside")
        client.close()


def probe_events(redis_url: str, key: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    finally:
        client.close()


def new_job(db: Database, kind: str, params: dict[str, Any] | None = None) -> str:
    with db.session() as s:
        job_id = jobs.create_job(s, CTX, org_id=None, kind=kind, params=params).id
        drop_queued(s)  # published by the test, when it wants
    return job_id


def job_row(db: Database, job_id: str) -> Job:
    with db.session() as s:
        row = s.get(Job, job_id)
        assert row is not None
        return row


# The claim itself ----------------------------------------------------------------------------


def test_claim_is_refused_while_a_lease_is_live_and_granted_once_it_lapsed(db: Database) -> None:
    job_id = new_job(db, "system.ping")
    with db.session() as s:
        first = jobs.claim(s, job_id, "worker-a", 30, max_attempts=5)
        assert first is not None and (first.status, first.attempts, first.leased_by) == ("running", 1, "worker-a")
        assert first.lease_expires_at is not None and first.started_at is not None
        started_at = first.started_at
    with db.session() as s:
        assert jobs.claim(s, job_id, "worker-b", 30, max_attempts=5) is None  # running elsewhere, lease live
        assert jobs.renew_lease(s, job_id, "worker-b", 30) is False  # only the holder renews
        assert jobs.renew_lease(s, job_id, "worker-a", 30) is True
    with db.session() as s:  # worker-a stopped renewing: its lease ran out
        s.query(Job).filter(Job.id == job_id).update({Job.lease_expires_at: utcnow() - timedelta(seconds=1)})
    with db.session() as s:
        second = jobs.claim(s, job_id, "worker-b", 30, max_attempts=5)
        assert second is not None and (second.attempts, second.leased_by) == (2, "worker-b")
        assert second.started_at == started_at  # the first start is kept
    with db.session() as s:
        # The old holder wakes up: it can neither renew nor finish the job any more.
        assert jobs.renew_lease(s, job_id, "worker-a", 30) is False
        assert jobs.mark_succeeded(s, job_id, {"from": "a"}, lease="worker-a") is False
        assert jobs.mark_failed(s, job_id, "internal_error", "x", lease="worker-a") is False
    assert job_row(db, job_id).status == "running"
    with db.session() as s:
        assert jobs.mark_succeeded(s, job_id, {"from": "b"}, lease="worker-b") is True
    row = job_row(db, job_id)
    assert (row.status, row.result, row.lease_expires_at) == ("succeeded", {"from": "b"}, None)
    with db.session() as s:
        assert jobs.claim(s, job_id, "worker-c", 30, max_attempts=5) is None  # finished: never again


def test_claim_is_refused_at_the_attempts_cap(db: Database) -> None:
    job_id = new_job(db, "system.ping")
    with db.session() as s:
        s.query(Job).filter(Job.id == job_id).update({Job.attempts: 3})
    with db.session() as s:
        assert jobs.claim(s, job_id, "w", 30, max_attempts=3) is None
        assert jobs.claim(s, job_id, "w", 30, max_attempts=4) is not None


def test_the_web_tier_can_still_fail_a_running_job_and_the_holder_cannot_finish_it(db: Database) -> None:
    job_id = new_job(db, "secrets.reveal_value")
    with db.session() as s:
        assert jobs.claim(s, job_id, "worker-a", 30, max_attempts=5) is not None
    with db.session() as s:  # the reveal request timed out (app/secrets/reveal.py): no lease given
        assert jobs.mark_failed(s, job_id, "worker_unavailable", "no worker answered in time") is True
    with db.session() as s:
        assert jobs.renew_lease(s, job_id, "worker-a", 30) is False
        assert jobs.mark_succeeded(s, job_id, {"late": True}, lease="worker-a") is False
    row = job_row(db, job_id)
    assert (row.status, row.error_code, row.result) == ("failed", "worker_unavailable", None)


def test_release_gives_a_held_job_back_to_queued_for_its_retry(db: Database) -> None:
    job_id = new_job(db, "system.ping")
    with db.session() as s:
        assert jobs.claim(s, job_id, "worker-a", 30, max_attempts=5) is not None
    with db.session() as s:
        assert jobs.release(s, job_id, "worker-b") is False
        assert jobs.release(s, job_id, "worker-a") is True
    row = job_row(db, job_id)
    assert (row.status, row.leased_by, row.lease_expires_at, row.attempts) == ("queued", None, None, 1)
    with db.session() as s:  # the retried message claims it at once
        again = jobs.claim(s, job_id, "worker-a2", 30, max_attempts=5)
        assert again is not None and again.attempts == 2


def test_the_sweep_requeues_lapsed_jobs_fails_them_at_the_cap_and_leaves_live_ones(db: Database) -> None:
    lapsed, capped, live = (new_job(db, "system.ping") for _ in range(3))
    with db.session() as s:
        for job_id in (lapsed, capped, live):
            assert jobs.claim(s, job_id, f"w-{job_id}", 30, max_attempts=5) is not None
        past = utcnow() - timedelta(seconds=1)
        s.query(Job).filter(Job.id.in_([lapsed, capped])).update({Job.lease_expires_at: past})
        s.query(Job).filter(Job.id == capped).update({Job.attempts: 5})
    with db.session() as s:
        swept = jobs.sweep_leases(s, max_attempts=5, legacy_after=timedelta(hours=1))
    assert [p.job_id for p in swept.requeued] == [lapsed] and swept.lost == [capped]
    assert [(p.task) for p in swept.requeued] == ["system.ping"]
    assert (job_row(db, lapsed).status, job_row(db, lapsed).leased_by) == ("queued", None)
    row = job_row(db, capped)
    assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 5)
    assert job_row(db, live).status == "running"
    with db.session() as s:  # a second sweep finds nothing left to do
        again = jobs.sweep_leases(s, max_attempts=5, legacy_after=timedelta(hours=1))
    assert (again.requeued, again.lost) == ([], [])


def test_the_sweep_recovers_pre_lease_rows_but_never_an_in_process_cli_job(db: Database) -> None:
    legacy, cli, capped = (new_job(db, "system.ping") for _ in range(3))
    long_ago = utcnow() - timedelta(hours=2)
    with db.session() as s:
        # Claimed by a worker from before leases: running, no holder, no lease, untouched for 2 h.
        s.query(Job).filter(Job.id == legacy).update({Job.status: "running", Job.attempts: 1, Job.updated_at: long_ago})
        assert jobs.claim(s, cli, "cli:host:1", None) is not None  # `latchkey backfill run`: held, no expiry
        s.query(Job).filter(Job.id == cli).update({Job.updated_at: long_ago})
        s.query(Job).filter(Job.id == capped).update({Job.attempts: 5})  # queued, but can never be claimed
    with db.session() as s:
        swept = jobs.sweep_leases(s, max_attempts=5, legacy_after=timedelta(hours=1))
    assert [p.job_id for p in swept.requeued] == [legacy] and swept.lost == [capped]
    assert job_row(db, legacy).status == "queued"
    assert (job_row(db, cli).status, job_row(db, cli).leased_by) == ("running", "cli:host:1")
    assert (job_row(db, capped).status, job_row(db, capped).error_code) == ("failed", "attempts_exhausted")


# Real workers --------------------------------------------------------------------------------


def test_a_sigkilled_workers_job_is_finished_by_a_fresh_worker_within_two_lease_periods(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    with lease_queue(settings) as custom, probe_key(redis_url) as key:
        job_id = new_job(db, "tests.lease_probe", {"key": key, "first_seconds": 120, "seconds": 0})
        with spawned_worker(custom, tmp_path / "a.log", concurrency=1, include=INCLUDE) as (doomed, producer):
            jobs.Publisher(producer, db).send(job_id, "tests.lease_probe")
            wait_for(lambda: probe_events(redis_url, key))  # attempt 1 is inside the job body
            with spawned_worker(custom, tmp_path / "b.log", concurrency=2, include=INCLUDE) as (_fresh, fresh):
                first = job_row(db, job_id)
                assert (first.status, first.attempts) == ("running", 1)
                doomed.kill()  # SIGKILL: no cleanup, no ack, the row stays running
                doomed.wait(10)
                killed_at = utcnow()
                if backends.on_rabbitmq():
                    # RabbitMQ hands the dead connection's unacknowledged message to the other
                    # worker at once (Redis: only after the visibility timeout). The lease is
                    # still live, so that copy is turned away rather than run beside a job that
                    # might still be running; the sweep brings the job back once the lease lapses.
                    ran = f"[{job_id}] succeeded in"
                    lines = wait_for(lambda: [x for x in (tmp_path / "b.log").read_text().splitlines() if ran in x])
                    assert "'skipped'" in lines[0]
                    assert (job_row(db, job_id).status, job_row(db, job_id).attempts) == ("running", 1)

                def finished() -> Job | None:
                    fresh.send_task("jobs.sweep_leases").get(timeout=20)  # what beat sends
                    row = job_row(db, job_id)
                    return row if row.status in ("succeeded", "failed") else None

                done = wait_for(finished, timeout=30, interval=0.1)
        events = probe_events(redis_url, key)
    assert (done.status, done.attempts, done.result) == ("succeeded", 2, {"attempt": 2})
    assert done.leased_by != first.leased_by
    assert done.finished_at is not None and done.finished_at - killed_at <= timedelta(seconds=2 * LEASE)
    # Attempt 1 never left the body (killed); attempt 2 ran it once.
    assert [(e["event"], e["attempt"]) for e in events] == [("enter", 1), ("enter", 2), ("exit", 2)]


def test_a_worker_whose_lease_was_taken_over_cannot_finish_the_job(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    with lease_queue(settings, job_lease_seconds=1.0) as custom, probe_key(redis_url) as key:
        job_id = new_job(db, "tests.lease_probe", {"key": key, "first_seconds": 3})
        with spawned_worker(custom, tmp_path / "w.log", concurrency=1, include=INCLUDE) as (_w, producer):
            outcome = producer.send_task("tests.lease_probe", args=[job_id])
            wait_for(lambda: probe_events(redis_url, key))
            # The holder looks dead to the rest of the system: another worker took the job over.
            with db.session() as s:
                s.query(Job).filter(Job.id == job_id).update(
                    {Job.leased_by: "other-worker", Job.lease_expires_at: utcnow() + timedelta(seconds=60)}
                )
            assert outcome.get(timeout=30) == "lost"
        events = probe_events(redis_url, key)
    assert [e["event"] for e in events] == ["enter", "exit"]  # the body ran to its end...
    row = job_row(db, job_id)
    # ...but its outcome was not recorded: the job is still the new holder's.
    assert (row.status, row.leased_by, row.result, row.finished_at) == ("running", "other-worker", None, None)


def test_a_backlog_of_duplicate_messages_never_runs_one_job_twice_at_once(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    # A 1 s lease under an 8 s job: the job only stays exclusive because its holder renews it.
    with lease_queue(settings, job_lease_seconds=1.0) as custom, probe_key(redis_url) as key:
        job_id = new_job(db, "tests.lease_probe", {"key": key, "first_seconds": 8, "seconds": 8})
        with (
            spawned_worker(custom, tmp_path / "a.log", concurrency=2, include=INCLUDE) as (_a, producer),
            spawned_worker(custom, tmp_path / "b.log", concurrency=2, include=INCLUDE),
        ):
            # The same job id, many times, as requeue_stuck re-sends a job waiting in a long queue;
            # the later copies arrive after an unrenewed first lease would have lapsed.
            sent = [producer.send_task("tests.lease_probe", args=[job_id]) for _ in range(3)]
            wait_for(lambda: probe_events(redis_url, key))
            started_at = job_row(db, job_id).started_at
            assert started_at is not None
            for after in (1.5, 3.0, 4.5):  # seconds into the run: past 1, 3 and 4 unrenewed leases
                wait_for(lambda after=after: utcnow() - started_at > timedelta(seconds=after), timeout=10)
                sent.append(producer.send_task("tests.lease_probe", args=[job_id]))
            wait_for(lambda: sum(r.ready() for r in sent) >= 5, timeout=30)
            # Five copies were turned away while the one run was still inside the body, under its
            # renewed lease: it entered once, and nothing else ever entered beside it.
            assert [(e["event"], e["inside"]) for e in probe_events(redis_url, key)] == [("enter", 1)]
            assert job_row(db, job_id).status == "running"
            outcomes = sorted(r.get(timeout=30) for r in sent)
        events = probe_events(redis_url, key)
    assert outcomes == ["skipped"] * 5 + ["succeeded"]
    row = job_row(db, job_id)
    assert (row.status, row.attempts) == ("succeeded", 1)
    assert [(e["event"], e["inside"]) for e in events] == [("enter", 1), ("exit", 0)]


def test_a_crash_looping_job_stops_at_the_attempts_cap(
    settings: Settings, db: Database, redis_url: str, tmp_path: Path
) -> None:
    with lease_queue(settings, job_lease_seconds=1.0, job_max_attempts=3) as custom:
        beat_side = make_celery(custom)  # runs the sweep in this process, publishing to the real broker
        beat_side.loader.import_default_modules()
        sweep = beat_side.tasks["jobs.sweep_leases"]
        try:
            job_id = new_job(db, "tests.lease_crash")
            for attempt in (1, 2, 3):
                try:
                    with spawned_worker(custom, tmp_path / f"w{attempt}.log", concurrency=1, include=INCLUDE) as (
                        proc,
                        _producer,
                    ):
                        if attempt == 1:
                            jobs.Publisher(beat_side, db).send(job_id, "tests.lease_crash")
                        elif not backends.on_rabbitmq():
                            # The sweep re-queues the lapsed job and re-publishes it to this worker.
                            assert wait_for(lambda: sweep.apply().get()["requeued"], timeout=15, interval=0.1) == 1
                        else:
                            # RabbitMQ gave the dead worker's message back at once: this worker
                            # claims it once the lease lapsed, or the sweep re-publishes the job.
                            wait_for(lambda p=proc: p.poll() is not None or sweep.apply().get()["requeued"], timeout=15)
                        assert proc.wait(30) == 17  # the job killed its worker
                except RuntimeError:
                    # On RabbitMQ the redelivered message can reach a new worker, and kill it,
                    # before it has answered its first ping.
                    if not backends.on_rabbitmq() or attempt == 1:
                        raise
                row = job_row(db, job_id)
                assert (row.status, row.attempts) == ("running", attempt)
            # Attempt 3 was the last: the sweep fails the job instead of re-queueing it.
            assert wait_for(lambda: sweep.apply().get()["lost"], timeout=15, interval=0.1) == 1
        finally:
            worker_context(beat_side).close()
    row = job_row(db, job_id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 3)
    assert row.finished_at is not None


# Time limits and beat (issue #14) ------------------------------------------------------------


def _registered(settings: Settings) -> Any:
    app = make_celery(settings)
    app.loader.import_default_modules()
    return app


def test_every_task_declares_a_soft_limit_within_its_hard_limit_below_the_visibility_timeout(
    settings: Settings,
) -> None:
    app = _registered(settings)
    ours = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    assert {"jobs.requeue_stuck", "secrets.replay_invalidations", "mcp.refresh_tools"} <= set(ours)
    for name, task in ours.items():
        assert task.soft_time_limit and task.time_limit, name
        assert task.soft_time_limit <= task.time_limit, name
    longest = max(task.time_limit for task in ours.values())
    assert longest == LONGEST_TIME_LIMIT + HARD_GRACE_SECONDS
    options = app.conf.broker_transport_options
    if backends.on_rabbitmq():
        # RabbitMQ's redelivery timer is its consumer_timeout, the broker's setting: checked at
        # worker start (test_brokers.py). Publishes wait for the broker's confirm.
        assert options == {"confirm_publish": True}
    else:
        # A message is not redelivered while its task may still run, and not much later than that.
        assert longest < options["visibility_timeout"] <= longest + 120


def test_beat_can_send_every_scheduled_task(settings: Settings) -> None:
    queue = f"latchkey-beat-{uuid.uuid4().hex[:10]}"
    app = _registered(settings.model_copy(update={"queue": queue}))
    schedule = app.conf.beat_schedule
    scheduler = beat.Scheduler(app, lazy=True)
    try:
        with app.producer_or_acquire() as producer:
            for key, spec in schedule.items():
                entry = beat.ScheduleEntry(name=key, app=app, **spec)
                assert scheduler.apply_async(entry, producer=producer, advance=False).id
        sent = {headers["task"]: headers["timelimit"] for headers in queued_headers(settings, queue)}
        assert set(sent) == {spec["task"] for spec in schedule.values()}
        for task_name, (hard, soft) in sent.items():
            assert soft is not None and hard is not None and soft <= hard, task_name
        assert "jobs.sweep_leases" in sent  # the lease sweep is on the schedule
    finally:
        app.close()
        drop_queue(settings, queue)


def test_a_run_whose_lease_was_taken_over_stops_calling_the_model_and_writes_nothing(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """The issue's double run: a worker that lost the job sends nothing more and records nothing.

    The first model turn is slow; meanwhile the job is taken over (as the sweep and a second
    worker do after a stall). The first worker's renewal finds the lease gone: it makes no
    second model call, and the run row and its audit trail stay the new holder's to write.
    """
    with lease_queue(settings, job_lease_seconds=1.0) as custom, LlmTestServer() as llm:
        web = create_app(custom)
        try:
            f = Factory(web.extensions["latchkey.db"], web.test_client())
            org = f.org()
            admin = f.user(org, "admin")
            secret = f.secret(admin, org, value="sk-lease-provider-" + "k" * 24)["id"]
            provider = admin.post(
                f"orgs/{org}/providers",
                json={
                    "name": "P",
                    "provider_type": "openai_compatible",
                    "kind": "openai",
                    "model_id": "test-model",
                    "config": {"base_url": llm.url + "/v1"},
                    "secret_ref": secret,
                },
            ).get_json()["id"]
            agent = admin.post(f"orgs/{org}/agents", json={"name": "Bot", "provider_id": provider}).get_json()["id"]
            # Turn 1 (slow) asks for a tool; on the old code turn 2 then went to the model too.
            llm.script([{"delay_seconds": 3, "tool_calls": [{"name": "nope", "arguments": {}}]}, {"text": "done"}])
            log_path = tmp_path / "w.log"
            with spawned_worker(custom, log_path, concurrency=1):
                started = admin.post(f"orgs/{org}/agents/{agent}/runs", json={"input": "hi"}).get_json()
                job_id, run_id = started["job"]["id"], started["run"]["id"]
                wait_for(lambda: len(llm.requests) == 1, timeout=20)
                with db.session() as s:
                    s.query(Job).filter(Job.id == job_id).update(
                        {Job.leased_by: "other-worker", Job.lease_expires_at: utcnow() + timedelta(seconds=60)}
                    )
                wait_for(lambda: "not held by this worker" in log_path.read_text(), timeout=20)
        finally:
            web.extensions["latchkey.db"].dispose()
        assert len(llm.requests) == 1  # no second model call from the worker that lost the job
    with db.session() as s:
        run = s.get(AgentRun, run_id)
        assert run is not None and (run.status, run.output, run.finished_at) == ("running", None, None)
        finished = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "agent.run_finished", AuditEvent.target_id == run_id)
        ).all()
        assert finished == []
    row = job_row(db, job_id)
    assert (row.status, row.leased_by) == ("running", "other-worker")
