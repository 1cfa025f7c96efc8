"""Prometheus metrics: web-side (``GET /metrics``) and worker-side (:func:`start_worker_metrics`).

Everything lives in prometheus_client's default registry, so metrics defined elsewhere
(the resolver's ``latchkey_resolver_*``) are exported by whichever process updates them.
Job counts and durations are read from the jobs table at scrape time: the table is the
truth, whichever web process answers the scrape. Labels are bounded: route templates,
never raw paths; known methods only; task names, never task arguments. No metric carries
a secret, a URL, or any other configuration value.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from app.db import Database, utcnow

log = logging.getLogger("latchkey.metrics")

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Web ------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "latchkey_http_requests",
    "HTTP requests answered, by method, route template and status",
    ["method", "endpoint", "status"],
)
HTTP_DURATION = Histogram(
    "latchkey_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template",
    ["method", "endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
# Incremented (``LEGACY_TOKEN_READS.labels("mcp_server").inc()``) wherever a deprecated legacy
# plaintext token is still used; ``kind`` is what holds it. Exported by the process that
# increments it (the worker, for MCP validation).
LEGACY_TOKEN_READS = Counter(
    "latchkey_legacy_token_reads",
    "Uses of deprecated legacy plaintext tokens, by what holds them (should fall to zero before removal)",
    ["kind"],
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"

# Worker ---------------------------------------------------------------------------------------

WORKER_TASKS = Counter(
    "latchkey_worker_tasks",
    "Celery tasks run by this worker, by task name and outcome (succeeded/failed/skipped for jobs)",
    ["task", "outcome"],
)
WORKER_TASK_DURATION = Histogram(
    "latchkey_worker_task_duration_seconds",
    "Time a Celery task ran in this worker, by task name",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
_JOB_OUTCOMES = frozenset({"succeeded", "failed", "skipped", "lost"})
# Every reveal job a worker answers: served, or refused with the job's stable error code
# (reveal_disabled, rate_limited, limiter_unavailable, secret_not_found, ...). Counted by the
# worker, so a compromised web tier cannot hide reveals from it. No org, user or secret label.
WORKER_REVEALS = Counter(
    "latchkey_worker_reveals",
    "Reveal jobs answered by this worker, by outcome (served/refused) and error code (empty when served)",
    ["outcome", "code"],
)

# Jobs read at scrape time -----------------------------------------------------------------------

# Durations are computed over jobs finished in this window ...
DURATION_WINDOW = timedelta(hours=1)
# ... that were created at most this long before the window (keeps the query on the
# (status, created_at) index; a job queued for longer than this is left out) ...
DURATION_LOOKBACK = timedelta(hours=24)
# ... and at most this many of them (the most recent).
DURATION_ROWS = 10_000
QUANTILES = (0.5, 0.95)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class JobsCollector(Collector):
    """Job gauges from the jobs table: counts by kind/status, oldest waiting, recent durations."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from app.models import Job, JobStatus

        ok = GaugeMetricFamily("latchkey_jobs_scrape_success", "1 if the jobs table could be read for this scrape")
        jobs = GaugeMetricFamily(
            "latchkey_jobs", "Jobs in the jobs table, by kind and status", labels=["kind", "status"]
        )
        oldest = GaugeMetricFamily(
            "latchkey_jobs_oldest_seconds",
            "Age of the oldest queued job (since created) and running job (since started), by kind",
            labels=["kind", "status"],
        )
        finished = GaugeMetricFamily(
            "latchkey_jobs_finished_last_hour",
            "Jobs that finished in the last hour, by kind and status",
            labels=["kind", "status"],
        )
        duration = GaugeMetricFamily(
            "latchkey_job_duration_last_hour_seconds",
            "Run time (started to finished) of jobs finished in the last hour: quantiles by kind",
            labels=["kind", "quantile"],
        )
        now = utcnow()
        done = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)
        try:
            with self.db.session() as s:
                counts = s.execute(
                    select(Job.kind, Job.status, func.count(), func.min(Job.created_at), func.min(Job.started_at))
                    .group_by(Job.kind, Job.status)
                    .order_by(Job.kind, Job.status)
                ).all()
                recent = s.execute(
                    select(Job.kind, Job.status, Job.started_at, Job.finished_at)
                    .where(
                        Job.status.in_(done),
                        Job.created_at >= now - DURATION_WINDOW - DURATION_LOOKBACK,
                        Job.finished_at >= now - DURATION_WINDOW,
                    )
                    .order_by(Job.finished_at.desc())
                    .limit(DURATION_ROWS)
                ).all()
        except Exception as exc:  # a scrape must answer; the reason goes to the log, not the page
            log.warning("metrics: jobs table unreadable (%s)", type(exc).__name__)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok

        seen: dict[str, set[str]] = {}
        for kind, status, count, min_created, min_started in counts:
            seen.setdefault(kind, set()).add(status)
            jobs.add_metric([kind, status], count)
            since = min_created if status == JobStatus.QUEUED else min_started if status == JobStatus.RUNNING else None
            if since is not None:
                oldest.add_metric([kind, status], max(0.0, (now - since).total_seconds()))
        # Zeros for the known statuses of every kind seen, so "queued > 0" alerts never see a gap.
        for kind, statuses in sorted(seen.items()):
            for status in JobStatus:
                if status.value not in statuses:
                    jobs.add_metric([kind, status.value], 0)
        yield jobs
        yield oldest

        per_status: dict[tuple[str, JobStatus], int] = {}
        runs: dict[str, list[float]] = {}
        for kind, status, started, ended in recent:
            per_status[(kind, status)] = per_status.get((kind, status), 0) + 1
            if started is not None and ended is not None:
                runs.setdefault(kind, []).append(max(0.0, (ended - started).total_seconds()))
        for (kind, status), count in sorted(per_status.items()):
            finished.add_metric([kind, status], count)
        for kind, values in sorted(runs.items()):
            values.sort()
            for q in QUANTILES:
                duration.add_metric([kind, str(q)], _quantile(values, q))
        yield finished
        yield duration


def multiprocess_mode() -> bool:
    """Whether prometheus_client keeps values in files (``PROMETHEUS_MULTIPROC_DIR`` was set at start)."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def exposed_registry(multiprocess_dir: str | None = None) -> Collector:
    """What a process serves: its own default registry or, in multiprocess mode (gunicorn with
    several workers, Celery's prefork pool), the values of every process of the group."""
    if multiprocess_dir is None and not multiprocess_mode():
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
    return registry


def render(db: Database) -> bytes:
    """The exposition text for ``GET /metrics``: this process (or process group) plus the jobs table."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(JobsCollector(db))
    return generate_latest(exposed_registry()) + generate_latest(scrape)


def _started() -> None:
    g.latchkey_metrics_started = time.perf_counter()


def _record(response: Response) -> Response:
    method = request.method if request.method in _METHODS else "OTHER"
    rule = request.url_rule
    endpoint = rule.rule if rule is not None else UNMATCHED
    HTTP_REQUESTS.labels(method, endpoint, str(response.status_code)).inc()
    started = g.pop("latchkey_metrics_started", None)
    if isinstance(started, float):
        HTTP_DURATION.labels(method, endpoint).observe(time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Count every request of ``app`` (call once from ``create_app``; later calls do nothing)."""
    if app.extensions.get("latchkey.metrics"):
        return
    app.extensions["latchkey.metrics"] = True
    # First in line, so the time includes the other before_request hooks (authentication is in the views).
    app.before_request_funcs.setdefault(None, []).insert(0, _started)
    app.after_request(_record)


# Worker ---------------------------------------------------------------------------------------

_task_started: dict[str, float] = {}
_task_lock = threading.Lock()


def task_started(task_id: str | None) -> None:
    """Celery ``task_prerun``."""
    if task_id:
        with _task_lock:
            _task_started[task_id] = time.perf_counter()


def task_finished(task_id: str | None, task_name: str | None, state: str | None, retval: Any) -> None:
    """Celery ``task_postrun``: count the outcome and observe the run time."""
    name = task_name or "unknown"
    with _task_lock:
        started = _task_started.pop(task_id, None) if task_id else None
    if state == "SUCCESS" and isinstance(retval, str) and retval in _JOB_OUTCOMES:
        outcome = retval
    else:
        outcome = (state or "unknown").lower()
    WORKER_TASKS.labels(name, outcome).inc()
    if started is not None:
        WORKER_TASK_DURATION.labels(name).observe(time.perf_counter() - started)


def start_worker_metrics(port: int, *, addr: str = "0.0.0.0", multiprocess_dir: str | None = None) -> Any:  # noqa: S104
    """Serve this worker's metrics on ``http://addr:port/metrics``; returns the server.

    With Celery's prefork pool the tasks (and the resolver) run in child processes, whose
    metrics the parent cannot see: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) for
    the whole worker before it starts, and this serves the values of every process of the
    worker (``multiprocess_dir`` names the directory explicitly). With ``--pool threads`` or
    ``solo`` nothing else is needed. Port 0 picks a free port (``server.server_port``).
    """
    server, _thread = start_http_server(port, addr=addr, registry=exposed_registry(multiprocess_dir))
    log.info("worker metrics on port %s", server.server_port)
    return server
