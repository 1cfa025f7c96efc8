"""A test-only task that resolves one secret in a loop through the worker's own resolver (``--include`` it).

``tests.resolve_loop`` is what "every worker resolves in a loop" means in the many-workers test
and benchmark: it resolves through ``WorkerContext.resolver`` (L1, L2, database, the worker's
invalidation listener and acknowledgements, exactly as a job does) until ``<key>:stop`` is set,
then pushes what it read to ``<key>:reads``. The values it resolves end in ``#<sequence number>``
(the edit that wrote it); only that number is reported, never a value. Reads are kept as runs of
one (version, sequence number): a run is ``[version, sequence, first start, last start, reads]``, with start times from
``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by every process on the machine). A run holds
a stale read only if its last read is stale (a later read of the same state is as stale), so
the first and last starts of each run are enough to find every run with a stale read.

``pause`` (seconds slept between two resolves) keeps K loops from taking every core of a small
machine from the web processes and the database they are measured against.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Task, shared_task
from prometheus_client import REGISTRY

from app.tasks.runtime import worker_context

SOURCES = ("l1", "l2", "db", "tombstone", "not_found")
STOP_CHECK_NS = 20_000_000  # look for the stop flag every 20 ms


def sequence(value: str) -> int:
    """The sequence number a test value ends with (``...#<n>``); -1 for any other value."""
    tail = value.rpartition("#")[2]
    return int(tail) if tail.isdigit() else -1


def _served() -> dict[str, float]:
    return {s: REGISTRY.get_sample_value("latchkey_resolver_resolves_total", {"source": s}) or 0.0 for s in SOURCES}


@shared_task(name="tests.resolve_loop", bind=True, ignore_result=True)
def resolve_loop(
    self: Task, org_id: str, secret_id: str, key: str, max_seconds: float = 120.0, pause: float = 0.0
) -> None:
    """Resolve ``secret_id`` until ``<key>:stop`` exists (or ``max_seconds``), ``pause`` s apart; report the reads."""
    ctx = worker_context(self.app)
    resolver = ctx.resolver
    client = redis.Redis.from_url(ctx.settings.redis_url)
    try:
        first = resolver.resolve(org_id, secret_id)  # builds the resolver's listener, fills L1
        listening = resolver.wait_until_listening(10.0)
        client.rpush(f"{key}:started", json.dumps({"pid": os.getpid(), "listening": listening}))
        before = _served()
        runs: list[list[Any]] = []
        errors: list[str] = []
        now = time.monotonic_ns
        version, value = first.version, first.value
        t = now()
        run: list[Any] = [version, sequence(value), t, t, 0]
        deadline = t + int(max_seconds * 1e9)
        next_check = t
        while True:
            t = now()
            if t >= next_check:
                if client.exists(f"{key}:stop") or t >= deadline:
                    break
                next_check = t + STOP_CHECK_NS
            try:
                got = resolver.resolve(org_id, secret_id)
            except Exception as exc:  # reported to the test, which fails on any
                errors.append(type(exc).__name__)
                if len(errors) > 100:
                    break
                continue
            if pause:
                time.sleep(pause)
            if got.version != version or got.value != value:
                runs.append(run)
                version, value = got.version, got.value
                run = [version, sequence(value), t, t, 1]
            else:
                run[3] = t
                run[4] += 1
        runs.append(run)
        after = _served()
        report = {
            "pid": os.getpid(),
            "runs": runs,
            "errors": errors,
            "served": {s: int(after[s] - before[s]) for s in SOURCES if after[s] != before[s]},
        }
        client.rpush(f"{key}:reads", json.dumps(report))
    finally:
        client.close()
