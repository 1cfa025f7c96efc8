"""Task functions run here, in the test process, through one Celery app (no worker process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from flask import Flask

from app.config import Settings
from app.db import Database
from tests.support.factories import Factory
from tests.unit.worker_support import parked_web, task_app


@pytest.fixture(scope="session")
def tasks_app(settings: Settings) -> Iterator[Celery]:
    with task_app(settings) as celery:
        yield celery


@pytest.fixture
def web(settings: Settings) -> Iterator[Flask]:
    with parked_web(settings) as app:
        yield app


@pytest.fixture
def factory(db: Database, web: Flask) -> Factory:
    """Rows made through a web app whose job messages nobody consumes: the test runs the jobs."""
    return Factory(db, web.test_client())
