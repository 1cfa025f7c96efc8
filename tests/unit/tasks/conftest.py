"""Task functions run here, in the test process, through one Celery app (no worker process).

The web app the rows are made through and that Celery app share a queue nobody consumes: a job
either of them queues (a follow-up the task queues itself, too) waits until the test runs it,
and both publish and hear cache invalidations on that same namespace, as one deployment does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from flask import Flask

from app.config import Settings
from app.db import Database
from app.factory import create_app
from tests.support.factories import Factory
from tests.support.processes import drop_queue
from tests.unit.worker_support import task_app


@pytest.fixture(scope="session")
def inproc_settings(settings: Settings) -> Iterator[Settings]:
    parked = settings.model_copy(update={"queue": f"latchkey-inproc-{uuid.uuid4().hex[:10]}"})
    yield parked
    drop_queue(settings, parked.queue)


@pytest.fixture(scope="session")
def tasks_app(inproc_settings: Settings) -> Iterator[Celery]:
    with task_app(inproc_settings) as celery:
        yield celery


@pytest.fixture(scope="session")
def web(inproc_settings: Settings) -> Iterator[Flask]:
    app = create_app(inproc_settings)
    yield app
    app.extensions["latchkey.db"].dispose()


@pytest.fixture
def factory(db: Database, web: Flask) -> Factory:
    """Rows made through a web app whose job messages nobody consumes: the test runs the jobs."""
    return Factory(db, web.test_client())
