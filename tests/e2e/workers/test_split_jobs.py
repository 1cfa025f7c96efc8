"""Split jobs on two real worker processes: backfill, verify and reseal parts taken by every worker."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.factory import create_app
from app.jobs import parts
from app.models import AuditEvent, Job, JobStatus
from app.secrets.keyring import Keyring
from tests.support import backends
from tests.support.factories import Factory
from tests.support.legacy_data import (
    AGENTS,
    BAD_AGENTS,
    LEGACY_SECRETS,
    MCP,
    ORG_B,
    ORG_C,
    _id,
    assert_complete,
    snapshot,
)
from tests.support.processes import spawned_worker
from tests.support.workers import wait_for, wait_job

# Two worker processes writing one SQLite file take turns on its single write lock: the split
# job's scale-out is a PostgreSQL deployment's (docs/workers.md). The SQLite lane runs the split
# jobs inline in one worker (tests/e2e/workers/test_backfill.py, test_rotation.py).
two_processes = pytest.mark.skipif(
    backends.forced_sqlite(), reason="split jobs across worker processes: the PostgreSQL + Redis lane"
)
EXTRA = 60  # extra legacy MCP servers in each of orgs B and C, so their parts take a while


def _extra_servers(url: str) -> tuple[dict[str, str], dict[str, str]]:
    tokens: dict[str, str] = {}
    orgs: dict[str, str] = {}
    rows = []
    for org, prefix in ((ORG_B, "d2000000"), (ORG_C, "d3000000")):
        for n in range(EXTRA):
            sid = _id(prefix, n)
            tokens[sid], orgs[sid] = f"split-token-{prefix}-{n:04d}-{'y' * 12}", org
            rows.append({"id": sid, "o": org, "n": f"split {n}", "u": "https://x.test", "t": tokens[sid]})
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :o, :n, :u, :t)"), rows
            )
    finally:
        engine.dispose()
    return tokens, orgs


@contextmanager
def two_workers(settings: Settings, url: str, tmp_path: Path, **overrides: Any) -> Iterator[tuple[Flask, list[Any]]]:
    """Two worker processes (one slot each) on a queue of their own, and a web app publishing to it."""
    custom = settings.model_copy(
        update={
            "queue": f"latchkey-split-{uuid.uuid4().hex[:10]}",
            "database_url": url,
            "job_lease_seconds": 1.0,
            **overrides,
        }
    )
    web = create_app(custom)
    try:
        with ExitStack() as stack:
            procs = [stack.enter_context(spawned_worker(custom, tmp_path / f"w{i}.log", 1))[0] for i in (1, 2)]
            yield web, procs
    finally:
        web.extensions["latchkey.db"].dispose()


def _parts(db: Database, job_id: str) -> list[Job]:
    with db.session() as s:
        return parts.finished(s, job_id)


def _backfill_events(db: Database, action: str) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent.target_id).where(AuditEvent.action == action)))


@two_processes
def test_backfill_and_verify_run_as_parts_on_both_workers_and_count_every_row_once(
    settings: Settings, legacy_url: str, keyring: Keyring, tmp_path: Path
) -> None:
    extra, extra_org = _extra_servers(legacy_url)
    with two_workers(settings, legacy_url, tmp_path) as (web, _procs):
        db = web.extensions["latchkey.db"]
        op = Factory(db, web.test_client()).user(operator=True)
        before = snapshot(db)

        dry = op.post("admin/backfill", json={"dry_run": True, "part_rows": 1, "batch_size": 7})
        assert dry.status_code == 202, dry.get_json()
        done = wait_job(op.get, f"admin/jobs/{dry.get_json()['job']['id']}", timeout=90)
        assert done["status"] == "succeeded", done
        assert done["result"]["parts"]["count"] == 3  # one per org: an org is never split
        assert done["result"]["mcp_servers"]["migrated"] == len(MCP) + len(extra)
        assert snapshot(db) == before  # a dry run's parts write nothing

        resp = op.post("admin/backfill", json={"part_rows": 1, "batch_size": 3})
        assert resp.status_code == 202, resp.get_json()
        job_id = resp.get_json()["job"]["id"]
        done = wait_job(op.get, f"admin/jobs/{job_id}", timeout=120)
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["parts"] == {"count": 3, "workers": 2}, result["parts"]
        assert result["secrets"] == {"migrated": len(LEGACY_SECRETS), "skipped": 0, "failed": 0, "failures": []}
        assert result["mcp_servers"]["migrated"] == len(MCP) + len(extra) and result["mcp_servers"]["failed"] == 0
        assert result["agents"]["migrated"] == len(AGENTS) and result["agents"]["failed"] == len(BAD_AGENTS)
        total = len(LEGACY_SECRETS) + len(MCP) + len(extra) + len(AGENTS) + len(BAD_AGENTS)
        assert done["progress"]["done"] == done["progress"]["total"] == total
        assert {p.status for p in _parts(db, job_id)} == {JobStatus.SUCCEEDED}
        assert_complete(db, keyring, extra_servers=extra, extra_org=extra_org)
        updates = _backfill_events(db, "mcp_server.update")
        assert len(updates) == len(set(updates)) == len(MCP) + len(extra)  # each row migrated exactly once

        check = op.post("admin/backfill/verify", json={"part_rows": 1})
        verified = wait_job(op.get, f"admin/jobs/{check.get_json()['job']['id']}", timeout=120)
        assert verified["status"] == "succeeded", verified
        assert verified["result"]["parts"]["count"] == 3
        # Not passed, for the one right reason: the bad agents are still unmigrated (nothing failed).
        assert verified["result"]["passed"] is False and verified["result"]["unmigrated"] == len(BAD_AGENTS)
        assert verified["result"]["failures"] == [] and verified["result"]["cache_check"]["ok"] is True
        counts = verified["result"]["counts"]
        assert counts["agents"]["matched"] == len(AGENTS) and counts["agents"]["unmigrated"] == len(BAD_AGENTS)
        assert counts["mcp_servers"]["matched"] == len(MCP) + len(extra)
        assert counts["secrets"]["matched"] == len(LEGACY_SECRETS)


@two_processes
def test_a_worker_killed_holding_a_part_loses_and_duplicates_nothing(
    settings: Settings, legacy_url: str, keyring: Keyring, tmp_path: Path
) -> None:
    """SIGKILL the worker that holds a part mid-way; the split job's own worker takes the part over."""
    extra, extra_org = _extra_servers(legacy_url)
    with two_workers(settings, legacy_url, tmp_path) as (web, procs):
        db = web.extensions["latchkey.db"]
        op = Factory(db, web.test_client()).user(operator=True)
        job_id = op.post("admin/backfill", json={"part_rows": 1, "batch_size": 1}).get_json()["job"]["id"]

        def holder_pid(job: Job) -> int | None:
            return int(job.leased_by.split(":")[1]) if job.leased_by else None

        def victim() -> tuple[Any, str] | None:
            """The other worker, once it holds a part half done."""
            with db.session() as s:
                parent = s.get(Job, job_id)
                if parent is None or parent.leased_by is None:
                    return None
                for part in s.scalars(select(Job).where(Job.parent_id == job_id, Job.status == JobStatus.RUNNING)):
                    pid = holder_pid(part)
                    if pid != holder_pid(parent) and 0 < part.progress_done < (part.progress_total or 0) - 20:
                        return next(p for p in procs if p.pid == pid), part.id
            return None

        found = wait_for(victim, 60, interval=0.005)
        assert found, "no part was held half done by the other worker"
        proc, killed_part = found
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

        done = wait_job(op.get, f"admin/jobs/{job_id}", timeout=120)
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["mcp_servers"]["migrated"] == len(MCP) + len(extra), result
        assert result["mcp_servers"]["skipped"] == 0 and result["mcp_servers"]["failed"] == 0
        assert result["secrets"]["migrated"] == len(LEGACY_SECRETS)
        with db.session() as s:
            taken_over = s.get(Job, killed_part)
            assert taken_over is not None and taken_over.status == JobStatus.SUCCEEDED and taken_over.attempts == 2
        assert_complete(db, keyring, extra_servers=extra, extra_org=extra_org)
        updates = _backfill_events(db, "mcp_server.update")
        assert len(updates) == len(set(updates)) == len(MCP) + len(extra)
        creates = _backfill_events(db, "secret.create")
        assert len(creates) == len(set(creates)) == result["created"]["secrets"]


@two_processes
def test_a_reseal_in_parts_on_both_workers_moves_every_value_to_the_new_key_once(
    settings: Settings, legacy_url: str, keyring_path: Path, tmp_path: Path
) -> None:
    from app.backfill.service import run_backfill
    from app.models import Secret
    from app.secrets.sealing import open_sealed, secret_context
    from tests.support.legacy_data import CTX

    ring_path = tmp_path / "ring.json"
    ring_path.write_bytes(keyring_path.read_bytes())
    ring_path.chmod(0o600)
    _extra_servers(legacy_url)
    with two_workers(settings, legacy_url, tmp_path, private_keys_file=ring_path) as (web, _procs):
        db = web.extensions["latchkey.db"]
        run_backfill(db, Keyring.load(ring_path).public_set(), CTX, batch_size=100)
        with db.session() as s:
            before = {x.id: (x.version, x.revision) for x in s.scalars(select(Secret))}
        ring = Keyring.load(ring_path)
        new_kid = ring.add_key()
        ring.write(ring_path, overwrite=True)
        op = Factory(db, web.test_client()).user(operator=True)
        # Many small parts, one value a batch: the split job's own worker works parts inline too,
        # and with a few quick parts it could finish them all before the other worker's message
        # arrives (seen on RabbitMQ: parts.workers == 1). Dozens of parts leave no such window.
        resp = op.post("admin/keys/reseal", json={"part_rows": 5, "batch_size": 1})
        assert resp.status_code == 202, resp.get_json()
        done = wait_job(op.get, f"admin/jobs/{resp.get_json()['job']['id']}", timeout=120)
        assert done["status"] == "succeeded", done
        result = done["result"]
        assert result["resealed"] == result["total"] == len(before) and result["changed"] == result["failed"] == 0
        assert result["parts"] == {"count": -(-len(before) // 5), "workers": 2}, result["parts"]
        with db.session() as s:
            secrets = list(s.scalars(select(Secret)))
        assert {x.key_id for x in secrets} == {new_kid}
        assert {x.id: (x.version, x.revision) for x in secrets} == before  # same values, no cache churn
        for x in secrets:
            assert x.ciphertext is not None
            open_sealed(ring, x.ciphertext, secret_context(x.org_id, x.id, x.version), new_kid)


def test_reseal_parts_cover_every_value_once(
    settings: Settings, legacy_url: str, keyring: Keyring, tmp_path: Path
) -> None:
    """The reseal's id ranges (every part_rows-th id a boundary) partition the values on old keys."""
    from app.backfill.service import run_backfill
    from app.secrets import rotation
    from tests.support.legacy_data import CTX

    extra, _orgs = _extra_servers(legacy_url)
    db = Database()
    db.configure(legacy_url)
    try:
        run_backfill(db, keyring.public_set(), CTX, batch_size=50)
        with db.session() as s:
            ids = sorted(
                s.scalars(
                    select(sa.column("id")).select_from(sa.table("secrets")).where(sa.column("ciphertext").is_not(None))
                )
            )
        for part_rows in (1, 7, len(ids), len(ids) + 5):
            planned = rotation.plan(db, "a-newer-key", part_rows)
            covered: list[str] = []
            for spec, rows in planned:
                inside = [
                    i
                    for i in ids
                    if (spec["after"] is None or i > spec["after"]) and (spec["upto"] is None or i <= spec["upto"])
                ]
                assert len(inside) == rows == spec["rows"]
                covered += inside
            assert covered == ids, part_rows
            assert len(planned) == -(-len(ids) // part_rows)
        assert rotation.plan(db, keyring.current_kid, 5) == []  # nothing on an old key
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Job)) == 0
    finally:
        db.dispose()
    assert extra
