"""Real processes for the tests: ``celery -A app.worker worker`` and gunicorn, with given settings.

Workers run as separate processes, as in production. (Celery's in-process test worker keeps
its shutdown flag in module globals, so two of them in one test process stop each other.)
The web tier runs as the Procfile runs it: gunicorn serving ``app:create_app()``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One JSON request to a server process on 127.0.0.1: (status, headers, raw body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = json.dumps(body) if body is not None else None
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), raw


def wait_http(port: int, proc: subprocess.Popen[Any], timeout: float = 40) -> None:
    """Wait until the server process answers ``GET /healthz`` with 200 (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        try:
            if http_request(port, "GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


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
    settings: Settings, log_path: Path, concurrency: int = 4, include: Sequence[str] = (), pool: str = "threads"
) -> Iterator[tuple[subprocess.Popen[bytes], Celery]]:
    """Start a worker process consuming ``settings.queue``; yields it (tests may kill it) and a producer.

    ``include`` names extra modules the worker imports (test-only tasks, e.g. tests.support.lease_tasks).
    """
    with spawned_workers(settings, [log_path], concurrency, include, pool) as (procs, producer):
        yield procs[0], producer


@contextmanager
def spawned_workers(
    settings: Settings,
    log_paths: Sequence[Path],
    concurrency: int = 4,
    include: Sequence[str] = (),
    pool: str = "threads",
) -> Iterator[tuple[list[subprocess.Popen[bytes]], Celery]]:
    """Start one worker process per log path, all at once; yields them once every one answers a ping."""
    nodes = [f"test-{uuid.uuid4().hex[:8]}@localhost" for _ in log_paths]
    logs = [path.open("ab") for path in log_paths]
    procs: list[subprocess.Popen[bytes]] = []
    producer = make_celery(settings)
    try:
        for node, log in zip(nodes, logs, strict=True):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "app.worker",
                        "worker",
                        "-P",
                        pool,
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
            )
        # Starting together, they share the CPU: more of them take longer.
        deadline = time.monotonic() + 30 + 15 * (len(procs) - 1)
        for node, proc, path in zip(nodes, procs, log_paths, strict=True):
            while not producer.control.ping(destination=[node], timeout=0.5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start; see {path}")
        yield procs, producer
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        producer.close()
        for log in logs:
            log.close()


@contextmanager
def worker_process(settings: Settings, log_path: Path, concurrency: int = 4) -> Iterator[Celery]:
    """Start a worker process consuming ``settings.queue``; yields a producer app for that queue."""
    with spawned_worker(settings, log_path, concurrency) as (_proc, producer):
        yield producer


def web_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a web process for ``settings``: the worker's, without the private keyring."""
    env = settings_env(settings)
    env.pop("LATCHKEY_PRIVATE_KEYS_FILE", None)
    env.update(extra)
    return env


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except OSError:
        return False


@contextmanager
def web_server(env: dict[str, str], log_path: Path, workers: int = 2) -> Iterator[int]:
    """gunicorn serving ``app:create_app()`` with ``workers`` processes, as the Procfile runs it; yields its port."""
    port = free_port()
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", str(workers), "app:create_app()"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 40
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start; see {log_path}")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


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
