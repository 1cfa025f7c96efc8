"""The Celery wiring: safe message settings, and a worker that boots against the real broker."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import celery.contrib.testing.tasks  # noqa: F401  (registers `celery.ping`, which start_worker's check runs)
import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from app.config import Environment, Settings
from app.worker import make_celery
from tests.support.processes import drop_queue, spawned_worker

ROOT = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).parent / "celery"


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


def test_messages_are_json_only_and_acknowledged_late(settings: Settings, celery_app: Celery) -> None:
    conf = celery_app.conf
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert "pickle" not in conf.accept_content and "pickle" not in (conf.result_accept_content or [])
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit and conf.task_soft_time_limit and conf.task_soft_time_limit < conf.task_time_limit


def test_broker_and_settings_come_from_the_given_settings(settings: Settings, celery_app: Celery) -> None:
    assert celery_app.conf.broker_url == settings.effective_broker_url
    assert celery_app.conf["latchkey_settings"] is settings
    other = make_celery(settings.model_copy(update={"broker_url": "redis://broker.invalid:6379/3"}))
    try:
        assert other.conf.broker_url == "redis://broker.invalid:6379/3"
        # Separate apps do not share configuration.
        assert celery_app.conf.broker_url == settings.effective_broker_url
    finally:
        other.close()


def test_worker_starts_on_the_real_broker_and_answers_ping(settings: Settings) -> None:
    # A private queue and node name, so a concurrent test session on the same Redis cannot interfere.
    # The queue is a setting, not a patch of the built app: on RabbitMQ the app's task_queues
    # (the consumer's own timeout) are made from it.
    queue = f"latchkey-test-{uuid.uuid4().hex[:12]}"
    celery_app = make_celery(settings.model_copy(update={"queue": queue}))
    hostname = f"{queue}@localhost"
    try:
        # perform_ping_check runs the `celery.ping` task through the broker and the result backend.
        with start_worker(
            celery_app,
            pool="solo",
            perform_ping_check=True,
            ping_task_timeout=15,
            hostname=hostname,
            shutdown_timeout=15,
        ) as worker:
            assert worker.hostname == hostname
            replies = celery_app.control.ping(destination=[hostname], timeout=5)
            assert replies == [{hostname: {"ok": "pong"}}]
    finally:
        celery_app.close()
        drop_queue(settings, queue)


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_process_freezes_its_startup_heap_where_tasks_run(
    settings: Settings, tmp_path: Path, pool: str
) -> None:
    # Full collections then skip the startup objects (app/worker.py): the task runs in a process
    # whose heap is frozen, the collector still on for what tasks allocate.
    custom = settings.model_copy(update={"queue": f"latchkey-test-{uuid.uuid4().hex[:12]}"})
    try:
        with spawned_worker(custom, tmp_path / "worker.log", 1, ["tests.support.heap_tasks"], pool) as (proc, app):
            state = app.send_task("tests.heap_state").get(timeout=30)
        assert state["frozen"] > 10_000
        assert state["gc_enabled"] is True
        # The prefork pool runs the task in a child, which froze its own heap once set up.
        assert (state["pid"] == proc.pid) is (pool == "threads")
    finally:
        drop_queue(settings, custom.queue)


def test_an_embedded_worker_leaves_its_hosts_collector_alone(settings: Settings) -> None:
    # Tests and embedders start workers in process; freezing their heap would keep whatever
    # they hold at that moment forever.
    queue = f"latchkey-test-{uuid.uuid4().hex[:12]}"
    celery_app = make_celery(settings.model_copy(update={"queue": queue}))
    before = gc.get_freeze_count()
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=15):
            assert gc.get_freeze_count() == before
    finally:
        celery_app.close()
        drop_queue(settings, queue)


def test_worker_refuses_to_boot_in_production_without_a_keyring(settings: Settings) -> None:
    production = settings.model_copy(update={"env": Environment.PRODUCTION, "private_keys_file": None})
    app = make_celery(production)
    try:
        with (
            pytest.raises(SystemExit) as info,
            start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=5),
        ):
            pytest.fail("the worker started without its keyring")
        assert info.value.code == 2
    finally:
        app.close()


def test_production_celery_worker_without_a_keyring_exits_with_one_line(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    # A reachable broker: if the check did not fire, the worker would start and the timeout would trip.
    env.update({"LATCHKEY_ENV": "production", "LATCHKEY_REDIS_URL": redis_url})
    proc = subprocess.run(
        [str(CELERY), "-A", "app.worker", "worker", "-P", "solo", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    naming = [line for line in proc.stderr.splitlines() if "LATCHKEY_PRIVATE_KEYS_FILE" in line]
    assert len(naming) == 1, proc.stderr
    assert naming[0].startswith("latchkey worker: ")
    assert "Traceback" not in proc.stderr
    assert "ready" not in proc.stdout + proc.stderr
