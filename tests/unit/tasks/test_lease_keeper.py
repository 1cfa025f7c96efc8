"""One lease-keeper thread per worker process renews the lease of every job the process runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, update

from app.config import Settings
from app.db import Database
from app.jobs import service as jobs
from app.models import Job
from app.tasks.runtime import Heartbeat, WorkerContext
from tests.support.factories import CTX
from tests.unit.worker_support import worker_ctx

LEASE = 0.6  # renewed every 0.2 s


def _claimed(db: Database, holder: str) -> str:
    with db.session() as s:
        job_id = jobs.create_job(s, CTX, org_id=None, kind="system.ping", publish=False).id
    with db.session() as s:
        assert jobs.claim(s, job_id, holder, LEASE, max_attempts=5) is not None
    return job_id


def _expiry(db: Database, job_id: str) -> datetime:
    with db.session() as s:
        value = s.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
    assert value is not None
    return value


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.02)


def _per_job_threads(ids: list[str]) -> list[str]:
    names = {f"lease-{job_id}" for job_id in ids}
    return [t.name for t in threading.enumerate() if t.name in names]


def _beat(wc: WorkerContext, job_id: str, holder: str) -> Heartbeat:
    return Heartbeat(wc, job_id, holder, time.monotonic())


def test_one_thread_renews_every_running_job_and_none_after_its_job_ended(settings: Settings, db: Database) -> None:
    with worker_ctx(settings.model_copy(update={"job_lease_seconds": LEASE})) as wc:
        ids = [_claimed(db, f"h{i}") for i in range(3)]
        first = {job_id: _expiry(db, job_id) for job_id in ids}
        beats = [_beat(wc, job_id, f"h{i}").__enter__() for i, job_id in enumerate(ids)]
        _wait_for(lambda: all(_expiry(db, job_id) > first[job_id] for job_id in ids), "every lease renewed")
        assert _per_job_threads(ids) == []  # not a thread per job: the process's keeper renewed them
        assert all(beat.held() for beat in beats)

        beats[0].__exit__(None, None, None)  # the first job ended
        ended_at = _expiry(db, ids[0])
        still = _expiry(db, ids[1])
        # Two more renewals of a job still running: the ended one was due as often, and was left alone.
        _wait_for(lambda: _expiry(db, ids[1]) > still, "a renewal after the end")
        still = _expiry(db, ids[1])
        _wait_for(lambda: _expiry(db, ids[1]) > still, "a second renewal after the end")
        assert _expiry(db, ids[0]) == ended_at
        for beat in beats[1:]:
            beat.__exit__(None, None, None)


def test_a_job_taken_over_is_lost_to_its_heartbeat_while_the_others_keep_theirs(
    settings: Settings, db: Database
) -> None:
    with worker_ctx(settings.model_copy(update={"job_lease_seconds": LEASE})) as wc:
        taken, kept = _claimed(db, "a"), _claimed(db, "b")
        with _beat(wc, taken, "a") as lost, _beat(wc, kept, "b") as alive:
            with db.session() as s:  # another worker holds it now (it claimed it after a stall)
                s.execute(update(Job).where(Job.id == taken).values(leased_by="someone-else"))
            _wait_for(lost.lost.is_set, "the renewal to find the job taken")
            assert not lost.held()
            before = _expiry(db, kept)
            _wait_for(lambda: _expiry(db, kept) > before, "the other job's next renewal")
            assert alive.held() and not alive.lost.is_set()
