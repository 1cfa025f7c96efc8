"""Secret housekeeping on the worker side."""

from __future__ import annotations

import redis
from celery import Task, shared_task

from app.secrets.invalidation import Invalidator
from app.tasks.runtime import worker_context


@shared_task(name="secrets.replay_invalidations", bind=True, acks_late=True, time_limit=60)  # type: ignore[untyped-decorator]
def replay_invalidations(self: Task) -> int:
    """Apply cache invalidations that Redis could not take when their change committed (beat)."""
    wc = worker_context(self.app)
    client = redis.Redis.from_url(wc.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return Invalidator(client, wc.db).replay()
    finally:
        client.close()
