"""Logging and metrics in real worker processes: a Celery worker's handlers, prefork children's metrics."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from app.config import Settings
from app.observability.redact import MASK
from tests.support.leaks import find_leaks
from tests.support.processes import drop_queue_keys

ROOT = Path(__file__).resolve().parents[2]


_WORKER_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, urllib.request
    from celery.contrib.testing.worker import start_worker
    from celery.utils.log import get_task_logger
    from prometheus_client import REGISTRY

    from app.observability import logs
    from app.config import load_settings
    from app.observability import metrics, redact
    from app.observability.redact import RedactingFilter
    from app.worker import make_celery

    database_url, redis_url, queue, secret = sys.argv[1:5]
    settings = load_settings({}, env="test", database_url=database_url, redis_url=redis_url)
    app = make_celery(settings.model_copy(update={"queue": queue}))
    redact.register(secret)

    @app.task(name="observability.leak")
    def leak():
        token = logs.set_job_id("job-obs-1")  # what app.tasks.runtime.run_job will do
        try:
            get_task_logger("observability").warning("task logger sees %s", secret)
            logging.getLogger("latchkey.observability").warning("app logger sees %s", secret)
            try:
                raise RuntimeError("failed with " + secret)
            except RuntimeError:
                logging.getLogger("latchkey.observability").exception("crash")
        finally:
            logs.reset_job_id(token)
        return "done"

    def filtered(name):
        handlers = logging.getLogger(name).handlers
        return bool(handlers) and all(isinstance(h.filters[0], RedactingFilter) for h in handlers)

    def formats(name):
        return sorted({type(h.formatter).__name__ for h in logging.getLogger(name).handlers})

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=15,
                      hostname=queue + "@localhost"):
        report = {
            "root_filtered": filtered(""),
            "task_filtered": filtered("celery.task"),
            "root_formats": formats(""),
            "task_formats": formats("celery.task"),
            "result": leak.delay().get(timeout=30),
        }
    report["tasks_counted"] = REGISTRY.get_sample_value(
        "latchkey_worker_tasks_total", {"task": "observability.leak", "outcome": "success"}
    )
    server = metrics.start_worker_metrics(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            report["metrics"] = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_a_celery_worker_gets_the_filter_and_format_on_its_handlers(settings: Settings, redis_url: str) -> None:
    # A separate process: start_worker's shutdown stops every embedded worker of its process
    # (celery.worker.state is global), and this one must not stop the session's worker.
    queue = f"latchkey-obs-{uuid.uuid4().hex[:12]}"
    secret = f"obs-secret-{secrets.token_urlsafe(16)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER_SCRIPT, settings.database_url, redis_url, queue, secret],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        drop_queue_keys(redis_url, queue)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["result"] == "done"
    # start_worker fired after_setup_logger / after_setup_task_logger: Celery's handlers were adopted.
    assert report["root_filtered"] and report["task_filtered"]
    assert report["root_formats"] == ["JsonFormatter"] and report["task_formats"] == ["JsonFormatter"]
    assert report["tasks_counted"] == 1.0
    assert "latchkey_worker_tasks_total" in report["metrics"]
    assert "latchkey_worker_task_duration_seconds_bucket" in report["metrics"]

    assert find_leaks([("stderr", proc.stderr), ("stdout", proc.stdout)], [secret]) == []
    entries = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    by_message = {e["message"]: e for e in entries}
    assert by_message[f"task logger sees {MASK}"]["job_id"] == "job-obs-1"
    assert by_message[f"app logger sees {MASK}"]["job_id"] == "job-obs-1"
    assert by_message["crash"]["exception"].endswith(f"RuntimeError: failed with {MASK}")


_MULTIPROCESS_SCRIPT = textwrap.dedent(
    """
    import multiprocessing, urllib.request
    from app.observability import metrics

    def child():
        metrics.task_started("t-1")
        metrics.task_finished("t-1", "jobs.example", "SUCCESS", "succeeded")

    if __name__ == "__main__":
        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        assert metrics.multiprocess_mode()  # from PROMETHEUS_MULTIPROC_DIR, read by prometheus_client
        server = metrics.start_worker_metrics(0, addr="127.0.0.1")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
                print(resp.read().decode())
        finally:
            server.shutdown()
            server.server_close()
    """
)


@pytest.mark.slow
def test_worker_metrics_see_prefork_children_in_multiprocess_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    script = tmp_path / "mp.py"
    script.write_text(_MULTIPROCESS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 'latchkey_worker_tasks_total{outcome="succeeded",task="jobs.example"} 1.0' in proc.stdout
