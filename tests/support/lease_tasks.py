"""Test-only job tasks for the lease tests, imported by worker processes via ``--include``.

``tests.lease_probe`` records every entry into and exit from its body in Redis (under the
job's ``key`` param), with the number of bodies of that job running at that moment, so a
test can see whether two executions of one job ever overlapped. ``tests.lease_crash`` kills
its whole worker process the moment it runs (a crash loop: no cleanup, no ack, no finish).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from app.tasks.runtime import JobView, WorkerContext, job_task


@job_task("tests.lease_probe", time_limit=120, max_retries=0)
def lease_probe(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Sleep ``seconds`` (``first_seconds`` on the first attempt), recording entry and exit."""
    key = str(job.params["key"])
    seconds = float(job.params.get("first_seconds" if job.attempts == 1 else "seconds", 0))
    client = redis.Redis.from_url(ctx.settings.redis_url)
    try:
        inside = client.incr(f"{key}:inside")
        client.rpush(key, json.dumps({"event": "enter", "attempt": job.attempts, "inside": inside, "pid": os.getpid()}))
        time.sleep(seconds)
        inside = client.decr(f"{key}:inside")
        client.rpush(key, json.dumps({"event": "exit", "attempt": job.attempts, "inside": inside, "pid": os.getpid()}))
    finally:
        client.close()
    return {"attempt": job.attempts}


@job_task("tests.lease_crash", time_limit=60, max_retries=0)
def lease_crash(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Die like a SIGKILLed worker: the process ends at once, the job row stays ``running``."""
    os._exit(17)
