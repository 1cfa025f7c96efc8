"""A real Celery worker (threads pool) over the real broker, shared by the worker tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from app.config import Settings
from app.tasks import make_celery
from app.tasks.runtime import worker_context


@pytest.fixture(scope="session")
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    app.loader.import_default_modules()
    yield app
    worker_context(app).close()
    app.close()


@pytest.fixture(scope="session")
def worker(celery_app: Celery, app: Any, redis_url: str) -> Iterator[Celery]:
    """One worker for the whole session; tests only need it running."""
    with start_worker(
        celery_app, pool="threads", concurrency=4, perform_ping_check=False, shutdown_timeout=15, loglevel="WARNING"
    ):
        yield celery_app
    client = redis.Redis.from_url(redis_url)
    try:
        queue = celery_app.conf.task_default_queue
        leftovers = list(client.scan_iter(match=f"*{queue}*"))
        if leftovers:
            client.delete(*leftovers)
    finally:
        client.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def wait_job(get: Callable[[str], Any], path: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll a job URL until it has finished; returns the job."""

    def finished() -> dict[str, Any] | None:
        resp = get(path)
        assert resp.status_code == 200, resp.get_json()
        job: dict[str, Any] = resp.get_json()
        return job if job["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = wait_for(finished, timeout)
    return result
