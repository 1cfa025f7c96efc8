"""Web-side cache invalidation, with an outbox so none is ever lost.

A change to a secret writes a ``cache_invalidations`` row in its own transaction. Right after
the commit the web tier moves the Redis pointer forward, publishes the invalidation and waits
(briefly) for every subscribed worker to acknowledge that it dropped its in-process copy; then
it deletes the outbox row. If Redis cannot take it, the row stays and beat replays it; the
cache TTLs bound staleness even then.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

import redis
from prometheus_client import Counter, Histogram
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database, defer
from app.models import CacheInvalidation
from app.secrets import cachekeys

log = logging.getLogger("latchkey.invalidation")

# The acknowledgement bookkeeping of every invalidation this process published: whether every
# worker subscribed at the moment of the publish acknowledged it in time, how many were
# subscribed, how many acknowledged (the two sums are equal when nothing timed out), and how
# long the wait for the last one took. Web processes export them on /metrics.
INVALIDATIONS = Counter(
    "latchkey_cache_invalidations",
    "Cache invalidations published, by outcome (acknowledged: by every subscribed worker; timeout: not all in time)",
    ["outcome"],
)
_ACKNOWLEDGED = INVALIDATIONS.labels("acknowledged")
_TIMED_OUT = INVALIDATIONS.labels("timeout")
SUBSCRIBERS = Counter(
    "latchkey_cache_invalidation_subscribers",
    "Workers subscribed to the invalidation channel when each invalidation was published (summed)",
)
ACKS = Counter(
    "latchkey_cache_invalidation_acks",
    "Acknowledgements received from workers that dropped their in-process copy (summed)",
)
ACK_WAIT = Histogram(
    "latchkey_cache_invalidation_ack_wait_seconds",
    "From the publish to the last acknowledgement (or the timeout)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


@dataclass(frozen=True)
class Pending:
    id: str
    org_id: str
    secret_id: str
    pointer: str


@dataclass(frozen=True)
class Delivery:
    """What one published invalidation reached: subscribed workers, and how many acknowledged."""

    subscribers: int
    acknowledged: int

    @property
    def complete(self) -> bool:
        return self.acknowledged >= self.subscribers


def stage(session: Session, org_id: str, secret_id: str, pointer: str) -> None:
    """Record, inside the change's transaction, that this secret's cache must move to ``pointer``."""
    row = CacheInvalidation(org_id=org_id, secret_id=secret_id, pointer=pointer)
    session.add(row)
    session.flush()
    defer(session, "invalidate", Pending(row.id, org_id, secret_id, pointer))


def await_acks(client: redis.Redis, ack_key: str, expected: int, deadline: float) -> int:
    """Pop acknowledgements from ``ack_key`` until ``expected`` arrived or ``deadline`` (monotonic) passed.

    Workers answer in parallel, so acknowledgements arrive together: after a blocking pop
    returns one, a single LPOP takes every other one already there, and waiting for K workers
    costs about one round trip more than waiting for one, not K. Acknowledgements that arrived
    in time are counted even when this process is late to look (it was not scheduled).
    """
    acked = 0
    while acked < expected:
        left = deadline - time.monotonic()
        if left <= 0:
            late = client.lpop(ack_key, expected - acked)
            return acked + len(late or [])
        if client.blpop([ack_key], timeout=max(left, 0.01)) is None:
            continue
        acked += 1
        if acked < expected:
            more = client.lpop(ack_key, expected - acked)
            acked += len(more or [])
    return acked


class Invalidator:
    def __init__(
        self,
        client: redis.Redis,
        db: Database,
        *,
        ttl: int = 600,
        ack_timeout: float = 0.5,
        namespace: str = "latchkey",
    ) -> None:
        self.redis = client
        self.channel = cachekeys.channel(namespace)
        self.db = db
        self.ttl = ttl
        self.ack_timeout = ack_timeout
        self._move = client.register_script(cachekeys.MOVE_POINTER)

    @classmethod
    def for_settings(cls, client: redis.Redis, db: Database, settings: Settings) -> Invalidator:
        """The deployment's invalidator: its channel, entry TTL and acknowledgement timeout."""
        return cls(
            client,
            db,
            ttl=settings.secret_cache_ttl_seconds,
            ack_timeout=settings.secret_ack_timeout_seconds,
            namespace=settings.queue,
        )

    def apply(self, item: Pending) -> Delivery:
        """Move the pointer, publish, and wait for the subscribed workers' acknowledgements."""
        self._move(keys=[cachekeys.key(item.org_id, item.secret_id)], args=[item.pointer, self.ttl])
        nonce = uuid.uuid4().hex
        message = json.dumps({"o": item.org_id, "i": item.secret_id, "p": item.pointer, "n": nonce})
        receivers = int(self.redis.publish(self.channel, message))
        ack_key = cachekeys.ACK_PREFIX + nonce
        published = time.monotonic()
        acked = await_acks(self.redis, ack_key, receivers, published + self.ack_timeout)
        if acked < receivers:
            log.warning("invalidation of %s: %d of %d workers acknowledged", item.secret_id, acked, receivers)
        ACK_WAIT.observe(time.monotonic() - published)
        self.redis.delete(ack_key)
        delivery = Delivery(receivers, acked)
        SUBSCRIBERS.inc(receivers)
        ACKS.inc(acked)
        (_ACKNOWLEDGED if delivery.complete else _TIMED_OUT).inc()
        return delivery

    def flush(self, items: list[Pending]) -> None:
        """Apply committed invalidations now; what Redis refuses stays in the outbox for beat."""
        done: list[str] = []
        for item in items:
            try:
                self.apply(item)
                done.append(item.id)
            except (redis.RedisError, OSError) as exc:
                log.warning("cache invalidation deferred to the outbox (%s)", type(exc).__name__)
                break
        if done:
            # One idempotent statement: an autocommit round trip, not a transaction of four.
            self.db.autocommit(lambda s: s.execute(delete(CacheInvalidation).where(CacheInvalidation.id.in_(done))))

    def replay(self, limit: int = 500) -> int:
        """Apply outbox rows left by earlier failures, oldest first (beat runs this)."""
        with self.db.session() as s:
            rows = s.scalars(select(CacheInvalidation).order_by(CacheInvalidation.created_at).limit(limit)).all()
            items = [Pending(r.id, r.org_id, r.secret_id, r.pointer) for r in rows]
            if items:
                s.execute(
                    update(CacheInvalidation)
                    .where(CacheInvalidation.id.in_([i.id for i in items]))
                    .values(attempts=CacheInvalidation.attempts + 1)
                )
        before = len(items)
        self.flush(items)
        return before
