"""``python -m bench.throughput``: no-op jobs per second through the API, against bare Celery tasks.

Two real worker processes (``celery -A app.worker worker -P threads -c 4``, the same processes for
both) consume this run's queue on the real Redis broker (database 13). In alternating rounds:

* **bare**: ``send_task("bench.noop")`` N times from one thread, then every result awaited
  (Celery's result backend): the broker, the worker and Celery, nothing of Latchkey;
* **Latchkey**: N ``POST /api/v1/admin/jobs/ping`` through the Flask test client (in process:
  authentication, the jobs row, publish on commit), then the jobs table polled until every row
  is ``succeeded`` (the worker claims the row, holds its lease, records the outcome).

Reported: jobs/s of each (median over the rounds) and their ratio. Goal: Latchkey's overhead at
most 1.5x the bare task's.

    .venv/bin/python -m bench.throughput [--n N] [--rounds R] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from app.factory import create_app
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
    throwaway_database,
    write_json,
)
from tests.support.processes import spawned_worker

GOAL_RATIO = 1.5
WORKERS = 2


def _bare(producer: Any, n: int) -> float:
    t0 = time.perf_counter()
    results = [producer.send_task("bench.noop") for _ in range(n)]
    for result in results:
        result.get(timeout=60)
    return n / (time.perf_counter() - t0)


def _latchkey(client: Any, headers: dict[str, str], poll: psycopg.Connection[Any], n: int) -> float:
    t0 = time.perf_counter()
    ids = []
    for _ in range(n):
        resp = client.post("/api/v1/admin/jobs/ping", headers=headers)
        if resp.status_code != 202:
            raise RuntimeError(f"POST /admin/jobs/ping: HTTP {resp.status_code}")
        ids.append(resp.get_json()["job"]["id"])
    deadline = time.monotonic() + 120
    while True:
        done = poll.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = 'succeeded'", (ids,), prepare=True
        ).fetchone()
        if done is not None and done[0] == n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {n} jobs succeeded in time")
        time.sleep(0.002)
    return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace, report: Report) -> None:
    keys = new_keys()
    queue = f"latchkey-bench-{os.getpid()}"
    with throwaway_database("throughput") as url:
        settings = make_settings(url, REDIS_URL, keys, queue=queue)
        app = create_app(settings)
        client = app.test_client()
        operator = make_user(app.extensions["latchkey.db"], operator=True)
        headers = {"Authorization": f"Bearer {operator.token}"}
        poll = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        logs = Path(tempfile.gettempdir())
        bare: list[float] = []
        ours: list[float] = []
        try:
            with (
                spawned_worker(settings, logs / f"{queue}-1.log", 4, include=["bench.noop_tasks"]) as (_p1, producer),
                spawned_worker(settings, logs / f"{queue}-2.log", 4, include=["bench.noop_tasks"]),
            ):
                _bare(producer, 50)  # warm-up: connections, pools, imports
                _latchkey(client, headers, poll, 50)
                for _ in range(args.rounds):
                    bare.append(_bare(producer, args.n))
                    ours.append(_latchkey(client, headers, poll, args.n))
        finally:
            poll.close()
            app.extensions["latchkey.db"].dispose()
            app.extensions["latchkey.redis"].close()
            import redis

            housekeeping = redis.Redis.from_url(REDIS_URL)
            delete_matching(housekeeping, f"*{queue}*", "celery-task-meta-*")
            housekeeping.close()
            keys.close()
    bare_rate, our_rate = statistics.median(bare), statistics.median(ours)
    ratio = bare_rate / our_rate
    report.results = {
        "workers": WORKERS,
        "jobs_per_round": args.n,
        "bare_celery_jobs_per_s": {"median": bare_rate, "rounds": bare},
        "latchkey_api_jobs_per_s": {"median": our_rate, "rounds": ours},
        "overhead_ratio": ratio,
    }
    report.goals = [
        Goal(
            "no-op jobs/s: bare Celery / Latchkey through the API",
            f"<= {GOAL_RATIO}x",
            f"{bare_rate:.0f} vs {our_rate:.0f} jobs/s",
            ratio <= GOAL_RATIO,
            ratio,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/throughput.json")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    report = Report("throughput", machine=machine_info())
    report.config = {"n": args.n, "rounds": args.rounds, "workers": WORKERS}
    run(args, report)
    r = report.results
    bare, ours = r["bare_celery_jobs_per_s"], r["latchkey_api_jobs_per_s"]
    rows = [
        ["bare Celery task", f"{bare['median']:.0f}", " ".join(f"{v:.0f}" for v in bare["rounds"])],
        ["Latchkey job via API", f"{ours['median']:.0f}", " ".join(f"{v:.0f}" for v in ours["rounds"])],
    ]
    print_table(["path", "jobs/s (median)", "rounds"], rows)
    print_goals(report.goals)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
