"""Secret tasks on the worker side: cache-invalidation replay and reveal."""

from __future__ import annotations

from typing import Any

import redis
from celery import Task

from app.jobs import service as jobs
from app.secrets import reveal
from app.secrets.invalidation import Invalidator
from app.secrets.resolver import ResolverUnavailableError, SecretNotFoundError
from app.tasks.runtime import (
    JobFailedError,
    JobView,
    TransientError,
    WorkerContext,
    job_task,
    periodic_task,
    worker_context,
)


@periodic_task("secrets.replay_invalidations", time_limit=60)
def replay_invalidations(self: Task) -> int:
    """Apply cache invalidations that Redis could not take when their change committed (beat)."""
    wc = worker_context(self.app)
    client = redis.Redis.from_url(wc.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return Invalidator(
            client, wc.db, ttl=wc.settings.secret_cache_ttl_seconds, namespace=wc.settings.queue
        ).replay()
    finally:
        client.close()


def _reply(ctx: WorkerContext, job: JobView, secret_id: str, reply_public_key: str, payload: dict[str, Any]) -> None:
    """Seal a reply to the waiting request's one-request key and push it (never in clear)."""
    assert job.org_id is not None
    sealed = reveal.seal_reply(reply_public_key, job.org_id, secret_id, job.id, payload)
    client = redis.Redis.from_url(ctx.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        reveal.push_reply(client, job.id, sealed)
    except redis.RedisError as exc:
        raise TransientError("reply_unavailable", f"could not hand the reply over ({type(exc).__name__})") from None
    finally:
        client.close()


@job_task(reveal.REVEAL_TASK, time_limit=30)
def reveal_value(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Resolve a secret and seal it to the requesting web request's one-request public key.

    The job row gets the version only; the value exists in clear only in this frame. Running
    twice is harmless: each run pushes a sealed reply that only the waiting request can open,
    and an unclaimed reply expires.
    """
    secret_id = job.params.get("secret_id")
    reply_public_key = job.params.get("reply_public_key")
    if job.org_id is None or not isinstance(secret_id, str) or not isinstance(reply_public_key, str):
        raise JobFailedError("invalid_params", "a reveal job needs an org, a secret id and a reply key")
    try:
        reveal.decode_public_key(reply_public_key)
    except ValueError as exc:
        raise JobFailedError("invalid_params", str(exc)) from None

    try:
        resolved = ctx.resolver.resolve(job.org_id, secret_id)
    except SecretNotFoundError:
        # Deleted since the request checked: tell it at once instead of letting it time out.
        _reply(ctx, job, secret_id, reply_public_key, {"error": "secret_not_found"})
        raise JobFailedError("secret_not_found", "the secret does not exist") from None
    except ResolverUnavailableError:
        _reply(ctx, job, secret_id, reply_public_key, {"error": "keyring_unavailable"})
        raise JobFailedError("keyring_unavailable", "the worker cannot open secrets (no keyring)") from None

    with ctx.db.session() as s:
        jobs.record_resolved(s, job.id, [{"secret_id": resolved.secret_id, "version": resolved.version}])
    _reply(ctx, job, secret_id, reply_public_key, {"value": resolved.value, "version": resolved.version})
    return {"version": resolved.version}
