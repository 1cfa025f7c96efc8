"""Helpers for the tests that drive real worker processes (the session `worker` fixture lives in tests/conftest.py)."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from flask import Flask

from app.config import Settings
from app.factory import create_app
from tests.support.processes import drop_queue, worker_process


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


@contextmanager
def extra_worker(settings: Settings, **overrides: Any) -> Iterator[tuple[Celery, Flask]]:
    """A second worker process (and a web app publishing to it) with other settings, on its own queue."""
    custom = settings.model_copy(update={"queue": f"latchkey-extra-{uuid.uuid4().hex[:10]}", **overrides})
    log = Path(tempfile.gettempdir()) / f"{custom.queue}.log"
    web = create_app(custom)
    try:
        with worker_process(custom, log, concurrency=2) as producer:
            yield producer, web
    finally:
        web.extensions["latchkey.db"].dispose()
        log.unlink(missing_ok=True)


@contextmanager
def parked_app(settings: Settings) -> Iterator[tuple[Flask, str]]:
    """A web app publishing to a queue nobody consumes (yet): jobs wait in the broker."""
    queue = f"latchkey-parked-{uuid.uuid4().hex[:10]}"
    web = create_app(settings.model_copy(update={"queue": queue}))
    try:
        yield web, queue
    finally:
        web.extensions["latchkey.db"].dispose()
        drop_queue(settings, queue)
