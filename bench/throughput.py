"""``python -m bench.throughput``: no-op jobs per second through the API, against bare Celery tasks.

Two real worker processes (``celery -A app.worker worker -P threads -c 4``, the same processes for
both) consume this run's queue on the real Redis broker (database 13). In alternating rounds:

* **bare**: N ``send_task("bench.noop")``, then every result awaited (Celery's result backend):
  the broker, the worker and Celery, nothing of Latchkey;
* **Latchkey**: N ``POST /api/v1/admin/jobs/ping`` through the Flask test client (in process:
  authentication, the jobs row and its audit event, commit, publish), then the jobs table polled
  until every row is ``succeeded`` (the worker claims the row, holds its lease, records the outcome).

Both sides are sent from ``--clients`` threads (default 1; each Latchkey thread has its own test
client). The comparison is what one client (or K) gets through each path on the same machine in
the same run. The Latchkey side's web tier runs in this process, on the client's thread: its CPU
(Flask, the token lookup, four statements, the publish) is part of what is measured, as it is part
of what a job costs; the bare side's client only publishes. With one client the Latchkey side is
bound by the request's latency (its round trips: pre-ping, BEGIN, four statements, COMMIT, two
Redis commands), the bare side by the workers; with several clients the request round trips
overlap, as they do behind a multi-worker web server, while the GIL still serialises the web tier's
Python in this one process (a deployed web tier has processes of its own).

Reported: jobs/s of each (median over the rounds) and their ratio. Goal: Latchkey's overhead at
most 1.5x the bare task's.

``--drain N`` adds where the time goes: two more workers are stopped (SIGSTOP) while N jobs of
each kind are queued (the Latchkey ones through the API), then resumed together and timed to the
last job done. That is the workers' side alone (claim, lease, outcome against a bare task's
result), without the client's.

    .venv/bin/python -m bench.throughput [--n N] [--rounds R] [--clients K] [--drain N] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg

from app.factory import create_app
from bench.common import (
    REDIS_URL,
    Goal,
    Report,
    cpu_delta,
    cpu_seconds_by_process,
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
from tests.support.processes import spawned_worker, spawned_workers, web_env, web_server

GOAL_RATIO = 1.5
WORKERS = 2


def _spread(n: int, clients: int, send: Callable[[int], list[Any]]) -> list[Any]:
    """``send(k)`` for k jobs on each of ``clients`` threads (n in all); everything they sent."""
    if clients == 1:
        return send(n)
    shares = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return [item for batch in pool.map(send, shares) for item in batch]


def _bare(producer: Any, n: int, clients: int = 1) -> float:
    t0 = time.perf_counter()
    results = _spread(n, clients, lambda k: [producer.send_task("bench.noop") for _ in range(k)])
    for result in results:
        result.get(timeout=60)
    return n / (time.perf_counter() - t0)


def _http_get(port: int, path: str, headers: dict[str, str]) -> None:
    """One ``GET path`` to the gunicorn web tier, a new connection as ``_http_post`` opens; 200 expected."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {resp.status}")


def _floors(port: int, headers: dict[str, str], job_id: str, n: int, clients: int) -> dict[str, dict[str, Any]]:
    """CPU per request of two requests that are less than a job, sent as the jobs are (same threads,
    a new connection each): what no design of a job through this web tier can cost less than.

    * ``http``: ``GET /healthz``: gunicorn, Flask, the JSON response; no authentication, no database;
    * ``authenticated``: ``GET /api/v1/admin/jobs/{id}``: the same plus the token lookup and one
      read of a job by id (what a client following its job sends).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, path, hdrs in (
        ("http", "/healthz", {}),
        ("authenticated", f"/api/v1/admin/jobs/{job_id}", headers),
    ):

        def send(k: int, path: str = path, hdrs: dict[str, str] = hdrs) -> list[Any]:
            for _ in range(k):
                _http_get(port, path, hdrs)
            return []

        _spread(50, clients, send)  # warm-up
        before = cpu_seconds_by_process()
        t0 = time.perf_counter()
        _spread(n, clients, send)
        elapsed = time.perf_counter() - t0
        spent = cpu_delta(cpu_seconds_by_process(), before)
        out[name] = {
            "requests_per_s": n / elapsed,
            "cpu_ms_per_request": {kind: 1000 * seconds / n for kind, seconds in spent.items()},
            "cores_busy": sum(spent.values()) / elapsed,
        }
    return out


def _http_post(port: int, headers: dict[str, str]) -> str:
    """One ``POST /api/v1/admin/jobs/ping`` to the gunicorn web tier; the job id."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/api/v1/admin/jobs/ping", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 202:
        raise RuntimeError(f"POST /admin/jobs/ping: HTTP {resp.status}")
    return str(json.loads(body)["job"]["id"])


def _post_pings(app: Any, headers: dict[str, str], k: int) -> list[str]:
    """``k`` ``POST /api/v1/admin/jobs/ping`` through a test client of this thread's own; the job ids."""
    client = app.test_client()
    sent = []
    for _ in range(k):
        resp = client.post("/api/v1/admin/jobs/ping", headers=headers)
        if resp.status_code != 202:
            raise RuntimeError(f"POST /admin/jobs/ping: HTTP {resp.status_code}")
        sent.append(resp.get_json()["job"]["id"])
    return sent


def _wait_succeeded(poll: psycopg.Connection[Any], ids: list[str]) -> None:
    """Poll the jobs table until every one of ``ids`` is ``succeeded`` (two minutes at most).

    Only the jobs not seen succeeded yet are asked for, every 5 ms: the poll shares the two cores
    and PostgreSQL with what it measures (asking for all 2,000 ids of a drain every 2 ms took as
    much of PostgreSQL's CPU as the workers' own statements), and 5 ms is within 1% of a round.
    """
    deadline = time.monotonic() + 120
    left = list(ids)
    while True:
        done = {row[0] for row in poll.execute(_SUCCEEDED, (left,), prepare=True)}
        left = [job_id for job_id in left if job_id not in done]
        if not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(left)} of {len(ids)} jobs had not succeeded in time")
        time.sleep(0.005)


_SUCCEEDED = "SELECT id FROM jobs WHERE id = ANY(%s) AND status = 'succeeded'"


def _latchkey(
    app: Any, headers: dict[str, str], poll: psycopg.Connection[Any], n: int, clients: int = 1, port: int | None = None
) -> float:
    def send(k: int) -> list[str]:
        if port is not None:
            return [_http_post(port, headers) for _ in range(k)]
        return _post_pings(app, headers, k)

    t0 = time.perf_counter()
    _wait_succeeded(poll, _spread(n, clients, send))
    return n / (time.perf_counter() - t0)


def _drain(
    settings: Any, app: Any, headers: dict[str, str], poll: psycopg.Connection[Any], n: int, bare: bool
) -> float:
    """Two workers stopped (SIGSTOP) while N jobs are queued, then resumed together: jobs/s until the last is done."""
    logs = Path(tempfile.gettempdir())
    paths = [logs / f"{settings.queue}-drain-{i}.log" for i in (1, 2)]
    with spawned_workers(settings, paths, 4, include=["bench.noop_tasks"]) as (procs, producer):
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        try:
            if bare:
                results = [producer.send_task("bench.noop") for _ in range(n)]
            else:
                ids = _post_pings(app, headers, n)
        finally:
            t0 = time.perf_counter()
            for proc in procs:
                os.kill(proc.pid, signal.SIGCONT)
        if bare:
            for result in results:
                result.get(timeout=120)
        else:
            _wait_succeeded(poll, ids)
        return n / (time.perf_counter() - t0)


def run(args: argparse.Namespace, report: Report) -> None:
    keys = new_keys()
    queue = f"latchkey-bench-{os.getpid()}"
    with throwaway_database("throughput") as url:
        settings = make_settings(url, REDIS_URL, keys, queue=queue)
        app = create_app(settings)
        operator = make_user(app.extensions["latchkey.db"], operator=True)
        headers = {"Authorization": f"Bearer {operator.token}"}
        poll = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        logs = Path(tempfile.gettempdir())
        bare: list[float] = []
        ours: list[float] = []
        # CPU seconds by process kind over each side's rounds (bench.common.cpu_seconds_by_process).
        cpu: dict[str, dict[str, float]] = {"bare": {}, "latchkey": {}}
        wall = {"bare": 0.0, "latchkey": 0.0}
        floors: dict[str, Any] = {}
        drained: dict[str, Any] = {}
        try:
            with ExitStack() as stack:
                _p1, producer = stack.enter_context(
                    spawned_worker(settings, logs / f"{queue}-1.log", 4, include=["bench.noop_tasks"])
                )
                stack.enter_context(spawned_worker(settings, logs / f"{queue}-2.log", 4, include=["bench.noop_tasks"]))
                port = None
                if args.web == "gunicorn":
                    port = stack.enter_context(web_server(web_env(settings), logs / f"{queue}-web.log", workers=2))
                _bare(producer, 50, args.clients)  # warm-up: connections, pools, imports
                _latchkey(app, headers, poll, 50, args.clients, port)
                for _ in range(args.rounds):
                    before = cpu_seconds_by_process()
                    bare.append(_bare(producer, args.n, args.clients))
                    middle = cpu_seconds_by_process()
                    ours.append(_latchkey(app, headers, poll, args.n, args.clients, port))
                    after = cpu_seconds_by_process()
                    wall["bare"] += args.n / bare[-1]
                    wall["latchkey"] += args.n / ours[-1]
                    for side, spent in (("bare", cpu_delta(middle, before)), ("latchkey", cpu_delta(after, middle))):
                        for kind, seconds in spent.items():
                            cpu[side][kind] = cpu[side].get(kind, 0.0) + seconds
                if port is not None:
                    job_id = poll.execute("SELECT id FROM jobs ORDER BY created_at DESC LIMIT 1").fetchone()
                    assert job_id is not None
                    floors = _floors(port, headers, str(job_id[0]), args.n, args.clients)
            # The rounds' workers have stopped: only the draining pair consumes the queue.
            if args.drain:
                drained = {
                    "drain_jobs": args.drain,
                    "drain_bare_jobs_per_s": _drain(settings, app, headers, poll, args.drain, bare=True),
                    "drain_latchkey_jobs_per_s": _drain(settings, app, headers, poll, args.drain, bare=False),
                }
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
        "clients": args.clients,
        "web": args.web,
        "jobs_per_round": args.n,
        "bare_celery_jobs_per_s": {"median": bare_rate, "rounds": bare},
        "latchkey_api_jobs_per_s": {"median": our_rate, "rounds": ours},
        "overhead_ratio": ratio,
        # Milliseconds of CPU per job by process kind, over every round of each side, and the
        # cores the whole machine kept busy meanwhile (2.0 on this machine: CPU-bound).
        "cpu_ms_per_job": {
            side: {kind: 1000 * seconds / (args.n * args.rounds) for kind, seconds in spent.items()}
            for side, spent in cpu.items()
        },
        "cores_busy": {side: sum(spent.values()) / wall[side] for side, spent in cpu.items() if wall[side]},
        **({"floors": floors} if floors else {}),
        **drained,
    }
    notes = ""
    if floors:
        # What the goal leaves for everything a job through the API adds to a bare task, against
        # what the cheapest authenticated request costs: on a CPU-bound machine jobs/s goes as
        # 1 / CPU per job, so a design whose job cost nothing but that request would reach this.
        bare_cpu = sum(report.results["cpu_ms_per_job"]["bare"].values())
        auth_cpu = sum(floors["authenticated"]["cpu_ms_per_request"].values())
        report.results["goal_room_ms_per_job"] = (GOAL_RATIO - 1) * bare_cpu
        report.results["floor_ratio"] = (bare_cpu + auth_cpu) / bare_cpu
        notes = (
            f"the goal leaves {(GOAL_RATIO - 1) * bare_cpu:.2f} ms of CPU per job for all Latchkey adds to a bare"
            f" task ({bare_cpu:.2f} ms); one authenticated GET costs {auth_cpu:.2f} ms, so a job that cost nothing"
            f" but that request would be at {(bare_cpu + auth_cpu) / bare_cpu:.2f}x"
        )
    report.goals = [
        Goal(
            "no-op jobs/s: bare Celery / Latchkey through the API",
            f"<= {GOAL_RATIO}x",
            f"{bare_rate:.0f} vs {our_rate:.0f} jobs/s",
            ratio <= GOAL_RATIO,
            ratio,
            notes,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="client threads on each side (default 1)")
    parser.add_argument(
        "--web",
        choices=("inprocess", "gunicorn"),
        default="inprocess",
        help="the API through Flask's test client in this process (default), or over HTTP to gunicorn"
        " with 2 web processes, as the Procfile runs it",
    )
    parser.add_argument(
        "--drain", type=int, default=0, metavar="N", help="also time 2 workers draining N queued jobs of each kind"
    )
    parser.add_argument("--json", default="bench/results/throughput.json")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)
    report = Report("throughput", machine=machine_info())
    report.config = {
        "n": args.n,
        "rounds": args.rounds,
        "workers": WORKERS,
        "clients": args.clients,
        "web": args.web,
        "drain": args.drain,
    }
    run(args, report)
    r = report.results
    bare, ours = r["bare_celery_jobs_per_s"], r["latchkey_api_jobs_per_s"]
    rows = [
        ["bare Celery task", f"{bare['median']:.0f}", " ".join(f"{v:.0f}" for v in bare["rounds"])],
        ["Latchkey job via API", f"{ours['median']:.0f}", " ".join(f"{v:.0f}" for v in ours["rounds"])],
    ]
    if args.drain:
        rows += [
            [f"bare, {args.drain} queued, drained", f"{r['drain_bare_jobs_per_s']:.0f}", ""],
            [f"Latchkey, {args.drain} queued, drained", f"{r['drain_latchkey_jobs_per_s']:.0f}", ""],
        ]
    print_table(["path", "jobs/s (median)", "rounds"], rows)
    per_job = r["cpu_ms_per_job"]
    kinds = list(per_job["bare"])
    print()
    print_table(
        ["CPU ms per job", *kinds, "all"],
        [
            [side, *(f"{per_job[side][k]:.2f}" for k in kinds), f"{sum(per_job[side].values()):.2f}"]
            for side in ("bare", "latchkey")
        ],
    )
    print("cores busy: " + ", ".join(f"{side} {busy:.2f}" for side, busy in r["cores_busy"].items()))
    if "floors" in r:
        print()
        print_table(
            ["floor: CPU ms per request", *kinds, "all", "requests/s", "cores busy"],
            [
                [
                    name,
                    *(f"{floor['cpu_ms_per_request'][k]:.2f}" for k in kinds),
                    f"{sum(floor['cpu_ms_per_request'].values()):.2f}",
                    f"{floor['requests_per_s']:.0f}",
                    f"{floor['cores_busy']:.2f}",
                ]
                for name, floor in r["floors"].items()
            ],
        )
    print_goals(report.goals)
    write_json(args.json, report)
    return 1 if args.strict and not report.all_passed else 0


if __name__ == "__main__":
    sys.exit(main())
