"""Shared set-up for tests that call the worker's code directly (no worker process).

The rows are made through a web app whose job messages go to a queue nobody consumes, so no
worker (the session's, if another test started it) can pick a job up before the test runs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from celery import Celery
from flask import Flask
from sqlalchemy import select

from app.config import Settings
from app.db import Database
from app.jobs.names import TaskName
from app.models import Job
from app.tasks.runtime import WorkerContext
from app.worker import make_celery
from tests.support.factories import Caller
from tests.support.workers import parked_app


@contextmanager
def parked_web(settings: Settings) -> Iterator[Flask]:
    with parked_app(settings) as (web, _queue):
        yield web


@contextmanager
def task_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app with every task registered; ``app.tasks[name].apply(...)`` runs one here."""
    import app.tasks.agents
    import app.tasks.mcp
    import app.tasks.secrets  # noqa: F401  (registers the tasks with the app below)
    from app.tasks.runtime import worker_context

    celery = make_celery(settings)
    try:
        yield celery
    finally:
        worker_context(celery).close()
        celery.close()


@contextmanager
def worker_ctx(settings: Settings) -> Iterator[WorkerContext]:
    """A worker's resources (database, resolver) built by hand: no Celery at all."""
    ctx = WorkerContext(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def run_task(celery: Celery, name: TaskName, job_id: str) -> Any:
    """Run a job task here, as a worker would on a delivery of ``job_id``.

    In a thread of its own, like a worker's pool thread: the test's main thread may have an
    event loop running (the browser tests' Playwright), and the MCP client runs its own.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(celery.tasks[name].apply, args=[job_id], task_id=job_id).result()
    return result.get(disable_sync_subtasks=False)


def only_job(db: Database, kind: TaskName) -> Job:
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == kind)).one()
        s.expunge(job)
        return job


def start_run(caller: Caller, org: str, agent_id: str, text: str = "hello") -> str:
    """Queue a run (its message parked); the run's id."""
    resp = caller.post(f"orgs/{org}/agents/{agent_id}/runs", json={"input": text})
    assert resp.status_code == 202, resp.get_json()
    run_id: str = resp.get_json()["run"]["id"]
    return run_id
