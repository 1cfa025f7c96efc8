"""Backfill + verify of 100,000 legacy MCP rows and 10,000 agents on PostgreSQL, in a real worker.

A throwaway database ``latchkey_bench_backfill_<pid>`` is built at revision 0001 and filled
with legacy rows: ``--orgs`` orgs, ``--mcp`` MCP servers with raw tokens (one in ten shares a
token with another server of its org), ``--secrets`` legacy plaintext secrets and ``--agents``
agents on them (openai and anthropic). It is expanded to the last revision before the contract.

Then, in the same run:
1. the baseline: a plain bulk copy of the same legacy rows (``INSERT ... SELECT`` into scratch
   tables), the floor for moving that data at all;
2. ``backfill.run`` and ``backfill.verify`` as jobs on a real Celery worker process (threads
   pool, one thread, the worker's own keyring), timed from the job rows;
3. the contract migration (which checks the verification) is applied and timed.

Peak RSS is the worker process's high-water mark (``VmHWM`` in /proc). The run checks what it
measured: the verification must pass with every row matched, or the benchmark fails.
Goals: backfill + verify within 120 s; worker peak RSS under 300 MB.
"""

from __future__ import annotations

import argparse
import random
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

from app import migrate
from app.config import Settings
from app.db import Database, new_id
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import Job, JobStatus
from bench.common import (
    CTX,
    PG_ADMIN_URL,
    REDIS_URL,
    Goal,
    Report,
    delete_matching,
    machine_info,
    make_settings,
    new_keys,
    print_goals,
    print_table,
    throwaway_database,
    write_json,
)
from tests.support.processes import spawned_worker

CHUNK = 5000


def fill_legacy(url: str, orgs: int, mcp: int, n_secrets: int, agents: int, seed: int) -> dict[str, int]:
    """Legacy rows as the pre-managed-secrets release wrote them (plain SQL at revision 0001)."""
    rnd = random.Random(seed)
    org_ids = [str(uuid.UUID(int=rnd.getrandbits(128))) for _ in range(orgs)]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO orgs (id, slug, name) VALUES (:id, :slug, :name)"),
                [{"id": o, "slug": f"org-{i}", "name": f"Org {i}"} for i, o in enumerate(org_ids)],
            )
            secret_ids: dict[str, list[str]] = {o: [] for o in org_ids}
            rows = []
            for i in range(n_secrets):
                org = org_ids[i % orgs]
                sid = new_id()
                secret_ids[org].append(sid)
                rows.append({"id": sid, "org": org, "v": "sk-" + secrets.token_urlsafe(30)})
            for k in range(0, len(rows), CHUNK):
                conn.execute(
                    sa.text("INSERT INTO secrets (id, org_id, value) VALUES (:id, :org, :v)"), rows[k : k + CHUNK]
                )
            last_token: dict[str, str] = {}
            rows = []
            for i in range(mcp):
                org = org_ids[i % orgs]
                token = last_token[org] if org in last_token and rnd.random() < 0.1 else secrets.token_urlsafe(32)
                last_token[org] = token
                rows.append(
                    {
                        "id": new_id(),
                        "org": org,
                        "n": f"Server {i} ü",
                        "u": f"https://mcp{i}.example.com/mcp",
                        "t": token,
                    }
                )
            for k in range(0, len(rows), CHUNK):
                conn.execute(
                    sa.text("INSERT INTO mcp_servers (id, org_id, name, url, token) VALUES (:id, :org, :n, :u, :t)"),
                    rows[k : k + CHUNK],
                )
            rows = []
            for i in range(agents):
                org = org_ids[i % orgs]
                kind = "openai/gpt-4o" if i % 3 else "anthropic/claude-3-5-sonnet"
                rows.append(
                    {"id": new_id(), "org": org, "n": f"agent {i}", "m": kind, "r": rnd.choice(secret_ids[org])}
                )
            for k in range(0, len(rows), CHUNK):
                conn.execute(
                    sa.text("INSERT INTO agents (id, org_id, name, model, secret_ref) VALUES (:id, :org, :n, :m, :r)"),
                    rows[k : k + CHUNK],
                )
    finally:
        engine.dispose()
    return {"orgs": orgs, "mcp_servers": mcp, "secrets": n_secrets, "agents": agents}


def bulk_copy_seconds(url: str) -> float:
    """The floor: copy the same legacy rows with INSERT ... SELECT (one statement per table)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE bench_copy_secrets (id varchar(36), org_id varchar(36), value text)"))
            conn.execute(
                sa.text(
                    "CREATE TABLE bench_copy_mcp (id varchar(36), org_id varchar(36), name varchar(200), "
                    "url text, token text)"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TABLE bench_copy_agents (id varchar(36), org_id varchar(36), model varchar(200), "
                    "secret_ref varchar(36))"
                )
            )
        start = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO bench_copy_secrets SELECT id, org_id, value FROM secrets"))
            conn.execute(sa.text("INSERT INTO bench_copy_mcp SELECT id, org_id, name, url, token FROM mcp_servers"))
            conn.execute(sa.text("INSERT INTO bench_copy_agents SELECT id, org_id, model, secret_ref FROM agents"))
        elapsed = time.perf_counter() - start
        with engine.begin() as conn:
            for table in ("bench_copy_secrets", "bench_copy_mcp", "bench_copy_agents"):
                conn.execute(sa.text(f"DROP TABLE {table}"))
        return elapsed
    finally:
        engine.dispose()


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_job(db: Database, producer: Any, kind: TaskName, params: dict[str, Any], timeout: float) -> Job:
    db.on_commit("publish", jobs.Publisher(producer, db).publish)
    with db.session() as s:  # published on commit
        job_id = jobs.create_job(s, CTX, org_id=None, kind=kind, params=params).id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                s.expunge(job)
                return job
        time.sleep(0.2)
    raise SystemExit(f"{kind} did not finish within {timeout}s")


def seconds(job: Job) -> float:
    assert job.started_at is not None and job.finished_at is not None
    return (job.finished_at - job.started_at).total_seconds()


def run(args: argparse.Namespace, report: Report) -> None:
    keys = new_keys()
    queue = f"latchkey-bench-{uuid.uuid4().hex[:8]}"
    try:
        with throwaway_database("backfill", "0001") as url:
            report.machine = machine_info(redis.Redis.from_url(REDIS_URL), url)
            t0 = time.perf_counter()
            report.results["rows"] = fill_legacy(url, args.orgs, args.mcp, args.secrets, args.agents, args.seed)
            migrate.upgrade(url, migrate.PRE_CONTRACT)
            report.results["setup_s"] = round(time.perf_counter() - t0, 1)
            copy_s = bulk_copy_seconds(url)

            settings: Settings = make_settings(url, REDIS_URL, keys, queue)
            db = Database()
            db.configure(url)
            log = Path(tempfile.gettempdir()) / f"{queue}.log"
            try:
                with spawned_worker(settings, log, concurrency=1) as (proc, producer):
                    idle_mb = vm_hwm_mb(proc.pid)
                    bf = run_job(db, producer, TaskName.BACKFILL, {"batch_size": args.batch_size}, args.timeout)
                    vf = run_job(db, producer, TaskName.VERIFY, {"batch_size": args.batch_size}, args.timeout)
                    peak_mb = vm_hwm_mb(proc.pid)
                t1 = time.perf_counter()
                migrate.upgrade(url, "head")
                contract_s = time.perf_counter() - t1
            finally:
                db.dispose()
                log.unlink(missing_ok=True)
                delete_matching(redis.Redis.from_url(REDIS_URL), f"*{queue}*")
    finally:
        keys.close()

    if bf.status != "succeeded" or vf.status != "succeeded":
        raise SystemExit(f"backfill {bf.status} {bf.error_code}; verify {vf.status} {vf.error_code}")
    assert bf.result is not None and vf.result is not None
    backfill_s, verify_s = seconds(bf), seconds(vf)
    total = backfill_s + verify_s
    counts = vf.result["counts"]
    rows = report.results["rows"]
    all_matched = (
        vf.result["passed"]
        and counts["mcp_servers"]["matched"] == rows["mcp_servers"]
        and counts["secrets"]["matched"] == rows["secrets"]
        and counts["agents"]["matched"] == rows["agents"]
    )
    report.results.update(
        {
            "backfill_s": round(backfill_s, 2),
            "verify_s": round(verify_s, 2),
            "backfill_plus_verify_s": round(total, 2),
            "bulk_copy_s": round(copy_s, 3),
            "ratio_vs_bulk_copy": round(total / copy_s, 1),
            "contract_migration_s": round(contract_s, 2),
            "worker_rss_idle_mb": round(idle_mb, 1),
            "worker_rss_peak_mb": round(peak_mb, 1),
            "backfill_summary": {k: bf.result[k] for k in ("secrets", "mcp_servers", "agents", "created")},
            "verify_counts": counts,
            "verify_passed": vf.result["passed"],
            "cache_check": vf.result["cache_check"],
            "rows_per_s": round((rows["mcp_servers"] + rows["secrets"] + rows["agents"]) / total),
        }
    )
    report.goals = [
        Goal("backfill + verify", "<= 120 s", f"{total:.1f} s", total <= 120),
        Goal("worker peak RSS", "< 300 MB", f"{peak_mb:.0f} MB", peak_mb < 300),
        Goal("verification", "passed, every row matched", "yes" if all_matched else "NO", bool(all_matched)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backfill", description=__doc__.split("\n")[0])
    parser.add_argument("--mcp", type=int, default=100_000, help="legacy MCP servers (default 100000)")
    parser.add_argument("--agents", type=int, default=10_000, help="legacy agents (default 10000)")
    parser.add_argument("--secrets", type=int, default=2_000, help="legacy secrets the agents use (default 2000)")
    parser.add_argument("--orgs", type=int, default=100, help="orgs (default 100)")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per batch (default 1000)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a job after this many seconds")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    args = parser.parse_args(argv)
    report = Report("backfill")
    report.config = {k: v for k, v in vars(args).items() if k not in ("json", "strict")} | {
        "database": PG_ADMIN_URL.rsplit("@", 1)[-1],
        "worker": "celery threads pool x1 (separate process)",
    }
    run(args, report)
    r = report.results
    print_table(
        ["measure", "value"],
        [
            [
                "rows (mcp / secrets / agents)",
                f"{r['rows']['mcp_servers']} / {r['rows']['secrets']} / {r['rows']['agents']}",
            ],
            ["backfill.run", f"{r['backfill_s']} s"],
            ["backfill.verify", f"{r['verify_s']} s"],
            ["bulk copy (INSERT ... SELECT)", f"{r['bulk_copy_s']} s"],
            ["ratio (backfill + verify) / copy", f"{r['ratio_vs_bulk_copy']}x"],
            ["contract migration", f"{r['contract_migration_s']} s"],
            ["worker RSS idle / peak", f"{r['worker_rss_idle_mb']} / {r['worker_rss_peak_mb']} MB"],
        ],
    )
    print_goals(report.goals)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
