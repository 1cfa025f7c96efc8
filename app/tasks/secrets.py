"""Secret tasks on the worker side: cache-invalidation replay and reveal."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Task
from sqlalchemy import select

from app.audit import service as audit
from app.context import Actor, RequestContext
from app.errors import WorkerError
from app.jobs import service as jobs
from app.jobs.names import TaskName
from app.models import Job, Secret
from app.observability.metrics import WORKER_REVEALS
from app.secrets import replies, reveal
from app.secrets.invalidation import Invalidator
from app.secrets.resolver import ResolverUnavailableError, SecretNotFoundError
from app.secrets.service import MANAGED
from app.tasks.runtime import (
    JobFailedError,
    JobView,
    TransientError,
    WorkerContext,
    job_task,
    periodic_task,
    worker_context,
)

log = logging.getLogger("latchkey.reveal")
WORKER = RequestContext(Actor("worker"))

# One gate per worker context (per process and Celery app): its in-process counts live as long as it.
_gates: dict[int, reveal.RevealGate] = {}
_gates_lock = threading.Lock()


def _gate(ctx: WorkerContext) -> reveal.RevealGate:
    with _gates_lock:
        gate = _gates.get(id(ctx))
        if gate is None:
            gate = _gates[id(ctx)] = reveal.RevealGate.from_settings(ctx.settings)
        return gate


@periodic_task(TaskName.REPLAY_INVALIDATIONS, time_limit=60)
def replay_invalidations(self: Task) -> int:
    """Apply cache invalidations that Redis could not take when their change committed (beat)."""
    wc = worker_context(self.app)
    client = redis.Redis.from_url(wc.settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return Invalidator.for_settings(client, wc.db, wc.settings).replay()
    finally:
        client.close()


def _reply(ctx: WorkerContext, job: JobView, secret_id: str, reply_public_key: str, payload: dict[str, Any]) -> None:
    """Seal a reply to the waiting request's one-request key and push it (never in clear)."""
    assert job.org_id is not None
    sealed = reveal.seal_reply(reply_public_key, job.org_id, secret_id, job.id, payload)
    try:
        replies.hand_over(ctx.settings.redis_url, job.id, sealed)
    except replies.ReplyUnavailableError as exc:
        raise TransientError(exc.code, exc.message) from None


def _requested_by(ctx: WorkerContext, job_id: str) -> str | None:
    """The job row's ``created_by``: whom the per-user limit counts (advisory: the web tier writes it)."""
    with ctx.db.session() as s:
        return s.scalar(select(Job.created_by).where(Job.id == job_id))


def _revealable(ctx: WorkerContext, org_id: str, secret_id: str) -> None:
    """Only an org's own secrets are revealed: a connection's tokens (kind ``connection``) are
    never, whatever a job row says (a forged one names any id), and look like a missing secret."""
    with ctx.db.session() as s:
        kind = s.scalar(select(Secret.kind).where(Secret.org_id == org_id, Secret.id == secret_id))
    if kind != MANAGED:
        raise SecretNotFoundError()


def _admit(ctx: WorkerContext, org_id: str, user_id: str | None) -> None:
    client = redis.Redis.from_url(
        ctx.settings.effective_worker_redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
    )
    try:
        _gate(ctx).admit(client, org_id, user_id)
    finally:
        client.close()


# What the job's error says when the resolver refuses (its own messages are for the worker log).
REFUSAL_MESSAGES = {
    SecretNotFoundError.code: "the secret does not exist",
    ResolverUnavailableError.code: "the worker cannot open secrets (no keyring)",
}


def _refuse(
    ctx: WorkerContext, job: JobView, secret_id: str, reply_public_key: str, user_id: str | None, exc: WorkerError
) -> JobFailedError:
    """Audit and count a reveal the worker did not serve, tell the waiting request; the job's error."""
    assert job.org_id is not None
    code, message = exc.code, REFUSAL_MESSAGES.get(exc.code, exc.message)
    reply = exc.reply() if isinstance(exc, reveal.RevealRefusedError) else None
    WORKER_REVEALS.labels("refused", code).inc()
    log.warning("reveal job %s refused: %s (org %s, secret %s)", job.id, code, job.org_id, secret_id)
    with ctx.db.session() as s:
        audit.record(
            s,
            WORKER,
            "secret.reveal_refused",
            org_id=job.org_id,
            target_type="secret",
            target_id=secret_id,
            details={"job_id": job.id, "code": code, "requested_by": user_id},
        )
    _reply(ctx, job, secret_id, reply_public_key, reply or {"error": code})
    return JobFailedError(code, message)


@job_task(TaskName.REVEAL_VALUE, time_limit=30)
def reveal_value(ctx: WorkerContext, job: JobView) -> dict[str, Any]:
    """Resolve a secret and seal it to the requesting web request's one-request public key.

    The job row gets the version only; the value exists in clear only in this frame. Running
    twice is harmless: each run pushes a sealed reply that only the waiting request can open,
    and an unclaimed reply expires.

    Before anything is resolved the worker applies its own controls (``reveal.RevealGate``:
    the reveal switch and the per-user, per-org and instance limits), which the web tier can
    neither see nor reset. Every answered reveal is audited by the worker on the org's chain
    (``secret.reveal_served`` / ``secret.reveal_refused``) and counted in ``latchkey_worker_reveals``.
    """
    secret_id = job.params.get("secret_id")
    reply_public_key = job.params.get("reply_public_key")
    if job.org_id is None or not isinstance(secret_id, str) or not isinstance(reply_public_key, str):
        WORKER_REVEALS.labels("refused", "invalid_params").inc()
        raise JobFailedError("invalid_params", "a reveal job needs an org, a secret id and a reply key")
    try:
        reveal.decode_public_key(reply_public_key)
    except ValueError as exc:
        WORKER_REVEALS.labels("refused", "invalid_params").inc()
        raise JobFailedError("invalid_params", str(exc)) from None

    user_id = _requested_by(ctx, job.id)
    try:
        _revealable(ctx, job.org_id, secret_id)
        _admit(ctx, job.org_id, user_id)
        resolved = ctx.resolver.resolve(job.org_id, secret_id)
    except WorkerError as exc:
        # Refused by the gate, or the secret was deleted since the request checked, or this
        # worker has no keyring: tell the waiting request at once instead of letting it time out.
        raise _refuse(ctx, job, secret_id, reply_public_key, user_id, exc) from None

    # Audited before the value leaves this frame: nothing is served without the worker's record.
    with ctx.db.session() as s:
        jobs.record_resolved(s, job.id, [{"secret_id": resolved.secret_id, "version": resolved.version}])
        audit.record(
            s,
            WORKER,
            "secret.reveal_served",
            org_id=job.org_id,
            target_type="secret",
            target_id=secret_id,
            details={"job_id": job.id, "version": resolved.version, "requested_by": user_id},
        )
    WORKER_REVEALS.labels("served", "").inc()
    log.info("reveal job %s served (org %s, secret %s, version %s)", job.id, job.org_id, secret_id, resolved.version)
    _reply(ctx, job, secret_id, reply_public_key, {"value": resolved.value, "version": resolved.version})
    return {"version": resolved.version}
