"""Real worker processes for the tests: ``celery -A app.worker worker`` with given settings.

Workers run as separate processes, as in production. (Celery's in-process test worker keeps
its shutdown flag in module globals, so two of them in one test process stop each other.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu import Connection, Queue
from kombu.message import Message
from pydantic import SecretStr

from app.broker import is_amqp
from app.config import Settings
from app.worker import make_celery


def settings_env(settings: Settings) -> dict[str, str]:
    """The LATCHKEY_* environment that reproduces ``settings`` in another process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATCHKEY_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple | list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, Enum):
            value = value.value
        env[f"LATCHKEY_{name.upper()}"] = str(value)
    return env


@contextmanager
def spawned_worker(
    settings: Settings, log_path: Path, concurrency: int = 4, include: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], Celery]]:
    """Start a worker process consuming ``settings.queue``; yields it (tests may kill it) and a producer.

    ``include`` names extra modules the worker imports (test-only tasks, e.g. tests.support.lease_tasks).
    """
    node = f"test-{uuid.uuid4().hex[:8]}@localhost"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app.worker",
            "worker",
            "-P",
            "threads",
            "-c",
            str(concurrency),
            "-n",
            node,
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            # On RabbitMQ the worker's event loop sleeps up to 10 s between timer events, and a
            # SIGTERM is seen only at the next one; the worker heartbeat (an event every 2 s, on
            # by default in production too) keeps it awake, so a test's worker stops in seconds.
            *([] if is_amqp(settings.effective_broker_url) else ["--without-heartbeat"]),
            *(["--include", ",".join(include)] if include else []),
        ],
        env=settings_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    producer = make_celery(settings)
    try:
        deadline = time.monotonic() + 30
        while not producer.control.ping(destination=[node], timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start; see {log_path}")
        yield proc, producer
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        producer.close()
        log.close()


@contextmanager
def worker_process(settings: Settings, log_path: Path, concurrency: int = 4) -> Iterator[Celery]:
    """Start a worker process consuming ``settings.queue``; yields a producer app for that queue."""
    with spawned_worker(settings, log_path, concurrency) as (_proc, producer):
        yield producer


def drop_queue(settings: Settings, queue: str) -> None:
    """Delete a test's own queue: from RabbitMQ when that is the broker, and its keys from Redis."""
    url = settings.effective_broker_url
    if is_amqp(url):
        with Connection(url, connect_timeout=3) as conn:
            conn.default_channel.queue_delete(queue)
    drop_queue_keys(settings.redis_url, queue)


def queued_messages(settings: Settings, queue: str) -> list[Message]:
    """The messages waiting in ``queue`` (nobody consumes it), read from the broker, left in place.

    Read through kombu, so the same code serves Redis and RabbitMQ; nothing is acknowledged, so
    closing the channel gives every message back to the queue.
    """
    with Connection(settings.effective_broker_url, connect_timeout=3) as conn:
        channel = conn.channel()
        try:
            bound = Queue(queue, channel=channel)
            messages = []
            while (message := bound.get(no_ack=False)) is not None:
                messages.append(message)
            return messages
        finally:
            channel.close()


def queued_headers(settings: Settings, queue: str) -> list[dict[str, Any]]:
    """The headers of the task messages waiting in ``queue``."""
    return [dict(m.headers) for m in queued_messages(settings, queue)]


def drop_queue_keys(redis_url: str, queue: str) -> None:
    """Delete the broker keys of a test's own queue (SCAN, never KEYS or FLUSHDB)."""
    client = redis.Redis.from_url(redis_url)
    try:
        leftovers = list(client.scan_iter(match=f"*{queue}*"))
        if leftovers:
            client.delete(*leftovers)
    finally:
        client.close()
