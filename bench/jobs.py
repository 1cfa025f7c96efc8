"""``python -m bench.jobs``: job overhead from API enqueue to ``succeeded`` for a no-op job.

A real Celery worker (``celery.contrib.testing.worker.start_worker``, threads pool) consumes a
private queue (``latchkey-bench-<pid>``) on the real Redis broker (database 13); the jobs are
enqueued with ``POST /api/v1/admin/jobs/ping`` through the Flask **test client** (in process, no
HTTP server: what is measured is the app and the queue, not a socket to the web tier), as an
operator with an API token, one job at a time.

For each job: the client-side time from just before the POST until ``succeeded`` is seen in the
jobs row, polled directly on an autocommit psycopg connection every ``--poll-interval`` (0.5 ms);
and the times the app recorded in the row (``created_at`` by the API, ``started_at`` and
``finished_at`` by the worker). A throwaway database ``latchkey_bench_jobs_<pid>`` is created and
dropped; in Redis only this run's queue keys and its jobs' result keys are deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import psycopg
import redis
from celery.contrib.testing.worker import start_worker

from app.factory import create_app
from app.tasks.runtime import worker_context
from app.worker import make_celery
from bench.common import (
    REDIS_URL,
    Goal,
    Report,
    delete_matching,
    machine_info,
    make_settings,
    make_user,
    new_keys,
    print_goals,
    print_table,
    summarize,
    throwaway_database,
    write_json,
)

GOAL_MS = 25.0
pc = time.perf_counter_ns
POLL_SQL = "SELECT status FROM jobs WHERE id = %s"


def run(args: argparse.Namespace, database_url: str, report: Report, keys: Any) -> None:
    queue = f"latchkey-bench-{os.getpid()}"
    settings = make_settings(database_url, REDIS_URL, keys, queue=queue)
    celery_app = make_celery(settings)
    celery_app.loader.import_default_modules()
    app = create_app(settings)
    client = app.test_client()
    db = app.extensions["latchkey.db"]
    operator = make_user(db, operator=True)
    headers = {"Authorization": f"Bearer {operator.token}"}
    poll = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    housekeeping = redis.Redis.from_url(REDIS_URL)
    job_ids: list[str] = []
    e2e: list[int] = []
    post: list[int] = []
    after_post: list[int] = []
    polls: list[int] = []
    failed = 0
    try:
        with start_worker(
            celery_app,
            pool="threads",
            concurrency=args.concurrency,
            perform_ping_check=False,
            shutdown_timeout=15,
            loglevel="WARNING",
        ):
            for i in range(args.warmup + args.n):
                t0 = pc()
                resp = client.post("/api/v1/admin/jobs/ping", headers=headers)
                t1 = pc()
                if resp.status_code != 202:
                    raise RuntimeError(f"POST /admin/jobs/ping: HTTP {resp.status_code} {resp.get_data()[:200]!r}")
                job_id = resp.get_json()["job"]["id"]
                deadline = time.monotonic() + args.timeout
                n_polls = 0
                while True:
                    n_polls += 1
                    row = poll.execute(POLL_SQL, (job_id,), prepare=True).fetchone()
                    status = row[0] if row else None
                    if status in ("succeeded", "failed"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"job {job_id} still {status} after {args.timeout} s")
                    time.sleep(args.poll_interval)
                t2 = pc()
                if i < args.warmup:
                    continue
                failed += status != "succeeded"
                job_ids.append(job_id)
                e2e.append(t2 - t0)
                post.append(t1 - t0)
                after_post.append(t2 - t1)
                polls.append(n_polls)
        rows = poll.execute(
            "SELECT id, created_at, started_at, finished_at, attempts FROM jobs WHERE id = ANY(%s)", (job_ids,)
        ).fetchall()
    finally:
        poll.close()
        worker_context(celery_app).close()
        celery_app.close()
        db.dispose()
        app.extensions["latchkey.redis"].close()
        delete_matching(housekeeping, f"*{queue}*", *(f"celery-task-meta-{j}" for j in job_ids))
        housekeeping.close()

    def delta_ns(a: Any, b: Any) -> int:
        return int((b - a).total_seconds() * 1e9)

    recorded = [delta_ns(r[1], r[3]) for r in rows if r[3] is not None]
    queued = [delta_ns(r[1], r[2]) for r in rows if r[2] is not None]
    running = [delta_ns(r[2], r[3]) for r in rows if r[2] is not None and r[3] is not None]
    report.results = {
        "jobs": len(job_ids),
        "failed": failed,
        "retried": sum(1 for r in rows if r[4] != 1),
        "enqueue_to_succeeded_observed_ms": summarize(e2e, 1e6),
        "post_request_ms": summarize(post, 1e6),
        "post_returned_to_succeeded_observed_ms": summarize(after_post, 1e6),
        "recorded_created_to_finished_ms": summarize(recorded, 1e6),
        "recorded_created_to_started_ms": summarize(queued, 1e6),
        "recorded_started_to_finished_ms": summarize(running, 1e6),
        "polls_per_job": summarize([p * 1000 for p in polls]),
    }
    observed = report.results["enqueue_to_succeeded_observed_ms"]["median"]
    recorded_med = report.results["recorded_created_to_finished_ms"]["median"]
    report.goals += [
        Goal(
            "no-op job, API enqueue -> succeeded observed (median)",
            f"< {GOAL_MS:.0f} ms",
            f"{observed:.2f} ms",
            observed < GOAL_MS and not failed,
            observed / GOAL_MS,
        ),
        Goal(
            "no-op job, finished_at - created_at recorded (median)",
            f"< {GOAL_MS:.0f} ms",
            f"{recorded_med:.2f} ms",
            recorded_med < GOAL_MS,
            recorded_med / GOAL_MS,
        ),
    ]


def print_report(report: Report) -> None:
    r = report.results
    c = report.config
    print(
        f"\njobs benchmark: {r['jobs']} no-op jobs (after {c['warmup']} warm-up), one at a time, "
        f"worker threads pool x{c['concurrency']}, broker {c['broker']}, enqueue via {c['enqueue_via']}"
    )
    print(f"machine: {report.machine.get('cpus')} CPUs, load {report.machine.get('loadavg_at_start')}\n")
    rows = []
    for name, label in (
        ("enqueue_to_succeeded_observed_ms", "API enqueue -> succeeded seen (client)"),
        ("post_request_ms", "  POST /admin/jobs/ping (202)"),
        ("post_returned_to_succeeded_observed_ms", "  202 returned -> succeeded seen"),
        ("recorded_created_to_finished_ms", "finished_at - created_at (recorded)"),
        ("recorded_created_to_started_ms", "  created_at -> started_at"),
        ("recorded_started_to_finished_ms", "  started_at -> finished_at"),
    ):
        s = r[name]
        rows.append([label, s["median"], s["p90"], s["p99"]])
    print_table(["ms", "median", "p90", "p99"], rows)
    print(
        f"failed {r['failed']}, retried {r['retried']}, "
        f"polls per job median {r['polls_per_job']['median']:.0f} (every {c['poll_interval_s'] * 1e3:.1f} ms)\n"
    )
    print_goals(report.goals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="timed jobs (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed jobs first (default 10)")
    parser.add_argument("--concurrency", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--poll-interval", type=float, default=0.0005, help="seconds between polls (default 0.0005)")
    parser.add_argument("--timeout", type=float, default=30.0, help="give up on a job after this many seconds")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    args = parser.parse_args(argv)

    report = Report("jobs")
    report.config = {
        "n": args.n,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "poll_interval_s": args.poll_interval,
        "broker": REDIS_URL,
        "enqueue_via": "Flask test client (in process)",
    }
    keys = new_keys()
    try:
        with throwaway_database("jobs") as url:
            report.machine = machine_info(redis.Redis.from_url(REDIS_URL), url)
            run(args, url, report, keys)
    finally:
        keys.close()
    print_report(report)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
