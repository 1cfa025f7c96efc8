"""Many workers, no stale read: the fleet, the edits and the checks shared by the test and the benchmark.

A fleet is K real worker processes (``celery -A app.worker worker -P threads -c 1``, each running
``tests.resolve_loop`` from ``tests.support.resolve_loop_tasks``: one loop per worker, since a
worker with one slot and prefetch 1 never takes a second message while the first runs) and one
gunicorn with 2 web processes, as the Procfile runs it. Edits are ``PATCH
/api/v1/orgs/{org}/secrets/{id}`` over HTTP from concurrent client threads, a new connection each
(gunicorn's sync workers close it after every response).

What is checked, from the bookkeeping of both sides:

* **stale reads** (``tests.support.stale_reads``): a read that started after some edit's response
  had returned and saw an older version; the workers report runs of reads of one state, and a
  run holds a stale read exactly when its last read is stale;
* **value/version mismatches**: every (version, sequence number) a worker saw is the pair the
  edit that made that version wrote;
* **acknowledgements**: the web processes' own counters (``app.secrets.invalidation``, summed
  over both processes by prometheus_client's multiprocess mode): invalidations acknowledged by
  every subscriber vs. timed out, subscribers reached and acknowledgements received. With K
  subscribers on the channel throughout, ``subscribers == acks == K x edits`` and no timeout
  means every edit was acknowledged by every worker.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.secrets import cachekeys
from tests.support.processes import spawned_workers, web_env, web_server
from tests.support.stale_reads import find_stale

LOOP_TASK = "tests.resolve_loop"
LOOP_MODULE = "tests.support.resolve_loop_tasks"


def value(seq: int) -> str:
    """The value edit ``seq`` writes (0: the one the secret is created with): ``<key>#<seq>``.

    ``<key>`` looks like a provider's API key (32 hex characters, a different one each edit),
    so each new value costs the workers what a real rotation does (the redaction registry's
    worst case, thousands of values that differ in a few characters, is tested on its own in
    tests/unit/observability). The loops report only the ``#<seq>`` tail.
    """
    key = hashlib.sha256(f"latchkey-many-workers:{seq}".encode()).hexdigest()[:32]
    return f"sk-{key}#{seq}"


@dataclass
class EditLog:
    """Every edit: its sequence number, the version it returned, when its response was read, its latency."""

    seqs: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    returned_ns: list[int] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What the workers read during one round of edits, checked against the edits."""

    workers: int
    reads: int
    runs: int
    stale_runs: int
    stale_examples: list[dict[str, Any]]
    stale_max_lag_ms: float
    mismatches: int
    errors: list[str]
    served: dict[str, int]
    pids: list[int]


class Fleet:
    """Worker processes (added one at a time) and one gunicorn, on a queue and channel of their own."""

    def __init__(self, settings: Settings, logs: Path, *, web_workers: int = 2, **overrides: Any) -> None:
        # A queue (and so an invalidation channel) of its own: no other worker receives its
        # loops or its invalidations. Quiet logs: DEBUG lines cost the loaded processes CPU.
        self.settings = settings.model_copy(
            update={"queue": f"latchkey-many-{uuid.uuid4().hex[:10]}", "log_level": "WARNING", **overrides}
        )
        self.logs = logs
        self.web_workers = web_workers
        self.channel = cachekeys.channel(self.settings.queue)
        self.redis = redis.Redis.from_url(self.settings.redis_url)
        self.producer: Celery | None = None
        self.workers = 0
        self.port = 0
        self.reports: list[dict[str, Any]] = []
        self._stack = ExitStack()

    def __enter__(self) -> Fleet:
        metrics_dir = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="latchkey-many-metrics-")))
        env = web_env(self.settings, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        self.port = self._stack.enter_context(web_server(env, self.logs / "web.log", workers=self.web_workers))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        finally:
            leftovers = list(self.redis.scan_iter(match=f"*{self.settings.queue}*"))
            if leftovers:
                self.redis.delete(*leftovers)
            self.redis.close()

    def grow(self, count: int) -> None:
        """Run ``count`` worker processes in all (starting the missing ones)."""
        if count <= self.workers:
            return
        logs = [self.logs / f"worker-{n}.log" for n in range(self.workers + 1, count + 1)]
        _procs, producer = self._stack.enter_context(
            spawned_workers(self.settings, logs, concurrency=1, include=[LOOP_MODULE])
        )
        self.producer = self.producer or producer
        self.workers = count

    def subscribers(self) -> int:
        return int(self.redis.pubsub_numsub(self.channel)[0][1])

    @contextmanager
    def loops(self, org_id: str, secret_id: str, *, pause: float) -> Iterator[None]:
        """One resolve loop on every worker while the block runs; then ``reports`` holds what each read."""
        assert self.producer is not None
        key = f"lkmany:{uuid.uuid4().hex[:12]}"
        for _ in range(self.workers):
            self.producer.send_task(LOOP_TASK, args=[org_id, secret_id, key, 300.0, pause])
        try:
            started = [self.redis.blpop([f"{key}:started"], timeout=30) for _ in range(self.workers)]
            if None in started:
                raise RuntimeError("not every worker started its resolve loop")
            pids = {json.loads(item[1])["pid"] for item in started if item is not None}
            if len(pids) != self.workers or not all(json.loads(i[1])["listening"] for i in started if i):
                raise RuntimeError(f"expected one listening loop on each of {self.workers} workers, got {started}")
            yield
        finally:
            self.redis.set(f"{key}:stop", 1, ex=600)
            raw = [self.redis.blpop([f"{key}:reads"], timeout=60) for _ in range(self.workers)]
            self.redis.delete(f"{key}:started", f"{key}:reads", f"{key}:stop")
        self.reports = [json.loads(item[1]) for item in raw if item is not None]
        if len(self.reports) != self.workers:
            raise RuntimeError("not every worker reported its reads")

    def check(self, edits: EditLog) -> Outcome:
        """The last round's reads against its edits."""
        return check_reads(self.reports, edits)

    def invalidation_counts(self) -> dict[str, float]:
        """The web processes' acknowledgement bookkeeping, summed over both (GET /metrics).

        ``acknowledged``/``timeout``: invalidations by outcome; ``subscribers``: workers reached,
        summed; ``acks``: acknowledgements received, summed; ``ack_wait_s``: time spent waiting
        for them, summed.
        """
        status, body = request(self.port, "GET", "/metrics")
        assert status == 200, body[:200]
        names = {
            "latchkey_cache_invalidation_subscribers_total": "subscribers",
            "latchkey_cache_invalidation_acks_total": "acks",
            "latchkey_cache_invalidation_ack_wait_seconds_sum": "ack_wait_s",
        }
        out = {"acknowledged": 0.0, "timeout": 0.0, "subscribers": 0.0, "acks": 0.0, "ack_wait_s": 0.0}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "latchkey_cache_invalidations_total":
                    out[sample.labels["outcome"]] += sample.value
                elif sample.name in names:
                    out[names[sample.name]] += sample.value
        return out


def request(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def edit_concurrently(port: int, path: str, token: str, seqs: range, clients: int) -> EditLog:
    """PATCH a new value (``value(seq)``) for every seq, from ``clients`` threads at once."""
    log = EditLog()
    lock = threading.Lock()
    todo = iter(seqs)
    start = threading.Barrier(clients)

    def client() -> None:
        start.wait()
        while True:
            with lock:
                seq = next(todo, None)
            if seq is None:
                return
            t0 = time.monotonic_ns()
            try:
                status, body = request(port, "PATCH", path, {"value": value(seq)}, token)
            except OSError as exc:
                with lock:
                    log.failures.append(f"{seq}: {type(exc).__name__}")
                continue
            t1 = time.monotonic_ns()
            with lock:
                if status != 200:
                    log.failures.append(f"{seq}: HTTP {status} {body[:120]!r}")
                    continue
                log.seqs.append(seq)
                log.versions.append(int(json.loads(body)["version"]))
                log.returned_ns.append(t1)
                log.latency_ns.append(t1 - t0)

    threads = [threading.Thread(target=client, name=f"editor-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return log


def check_reads(reports: list[dict[str, Any]], edits: EditLog) -> Outcome:
    """Stale reads and value/version mismatches in the workers' reports of one round."""
    wrote = dict(zip(edits.versions, edits.seqs, strict=True))
    # Reads before any edit of this round see the version the round started from; its sequence
    # number is whatever wrote it (not known here), so only versions this round wrote are checked.
    lasts: list[list[int]] = []
    versions: list[list[int]] = []
    mismatches = 0
    errors: list[str] = []
    served: dict[str, int] = {}
    for report in reports:
        lasts.append([run[3] for run in report["runs"]])
        versions.append([run[0] for run in report["runs"]])
        mismatches += sum(1 for run in report["runs"] if run[0] in wrote and wrote[run[0]] != run[1])
        errors.extend(f"worker {report['pid']}: {e}" for e in report["errors"])
        for source, n in report["served"].items():
            served[source] = served.get(source, 0) + n
    found = find_stale(lasts, versions, edits.returned_ns, edits.versions)
    return Outcome(
        workers=len(reports),
        reads=sum(run[4] for report in reports for run in report["runs"]),
        runs=sum(len(report["runs"]) for report in reports),
        stale_runs=found.stale,
        stale_examples=found.examples,
        stale_max_lag_ms=found.max_lag_ms,
        mismatches=mismatches,
        errors=errors,
        served=served,
        pids=[report["pid"] for report in reports],
    )
