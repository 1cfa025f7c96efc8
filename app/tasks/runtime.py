"""What every job task shares: the worker's resources and the job life cycle.

A task receives only a job id. It claims the row under a lease (queued -> running, or a
running job whose lease lapsed; a finished job or one held by a live lease is left alone,
so a redelivered or duplicated message changes nothing), renews the lease while it runs,
and records succeeded or failed with a stable error code, only while it still holds the
lease. Transient errors are retried with exponential backoff (the job goes back to queued
for the retry); any other ``WorkerError`` fails the job at once with its code and message
(which carry no secret), and anything unexpected with ``internal_error``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.errors import WorkerError
from app.jobs import service as jobs
from app.models import JobStatus
from app.observability.logs import reset_job_id, set_job_id

log = logging.getLogger("latchkey.worker")


class JobFailedError(WorkerError):
    """A job ends failed with this stable code and a safe message."""


class TransientError(WorkerError):
    """Worth retrying (a dependency blipped); after the last retry the job fails with ``code``."""


class JobLostError(Exception):
    """This worker no longer holds the job's lease: stop, write nothing, record no outcome."""


class Lease(Protocol):
    holder: str

    def held(self) -> bool: ...


@dataclass(frozen=True)
class JobView:
    id: str
    org_id: str | None
    kind: str
    params: dict[str, Any]
    attempts: int
    # The claim this run holds (None for a view built outside a worker's claim).
    lease: Lease | None = None
    # The split job this job is a part of (app/tasks/split.py).
    parent_id: str | None = None

    def ensure_held(self, session: Session | None = None) -> None:
        """Raise JobLostError unless this worker still holds the job.

        Without a session: a local check (the lease has not lapsed since its last renewal and
        no renewal found it taken), cheap enough before every model or tool call. With a
        session: the job row is locked for that transaction while we hold it (``jobs.hold``),
        for the transaction that records the outcome.
        """
        if self.lease is None:
            return
        if not self.lease.held() or (session is not None and not jobs.hold(session, self.id, self.lease.holder)):
            raise JobLostError(self.id)


class WorkerContext:
    """Per-process resources of a worker: settings, database, keyring, Redis, resolver."""

    def __init__(self, settings: Settings, celery: Any = None) -> None:
        """``celery``: the app job messages go out through; without one (the agent runner's
        tests), queuing a job is an error (``app.db.UnitOfWorkError``), never a silent drop."""
        from redis import Redis

        from app.jobs.service import Publisher
        from app.secrets.invalidation import Invalidator

        self.settings = settings
        self.db = Database()
        self.db.configure(settings.database_url)
        # What a task's transaction queues (jobs, cache invalidations) is sent when it commits.
        redis = Redis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.db.on_commit(
            "invalidate",
            Invalidator.for_settings(redis, self.db, settings).flush,
        )
        if celery is not None:
            self.db.on_commit("publish", Publisher(celery, self.db).publish)
        self.hostname = socket.gethostname()
        self.leases = LeaseKeeper()
        self._lock = threading.Lock()
        self._resolver: Any = None

    @property
    def resolver(self) -> Any:
        """The secret resolver; built on first use, so a worker without keys fails only where keys are needed."""
        with self._lock:
            if self._resolver is None:
                from app.secrets.resolver import build_resolver

                self._resolver = build_resolver(self.settings, self.db)
            return self._resolver

    def close(self) -> None:
        self.leases.stop()
        if self._resolver is not None:
            self._resolver.close()
        self.db.dispose()


_contexts: dict[int, WorkerContext] = {}
_contexts_lock = threading.Lock()


def worker_context(app: Any) -> WorkerContext:
    with _contexts_lock:
        ctx = _contexts.get(id(app))
        if ctx is None:
            ctx = _contexts[id(app)] = WorkerContext(app.conf["latchkey_settings"], app)
        return ctx


JobFn = Callable[[WorkerContext, JobView], dict[str, Any] | None]


def run_job(task: Task, job_id: str, fn: JobFn) -> str:
    token = set_job_id(job_id)  # every log line of this job carries its id
    try:
        return _run_job(task, job_id, fn)
    finally:
        reset_job_id(token)


def lease_holder(task: Task, wc: WorkerContext) -> str:
    """A holder id for one claim: the worker node and process (for people) and a random part,
    so a second delivery to the same process is a different holder."""
    node = getattr(task.request, "hostname", None) or wc.hostname
    return f"{node}:{os.getpid()}:{uuid.uuid4().hex[:12]}"[:200]


class Heartbeat:
    """A job's lease while this worker runs it: renewed every third of its length (by the
    process's :class:`LeaseKeeper`) until the job ends, or until a renewal finds the job no
    longer held (taken over after a stall, or failed by the web tier)."""

    def __init__(self, wc: WorkerContext, job_id: str, holder: str, claimed_at: float) -> None:
        self.wc = wc
        self.job_id = job_id
        self.holder = holder
        self.lease_seconds = wc.settings.job_lease_seconds
        # Until when (monotonic) the lease is surely ours: from before the claim or the last
        # successful renewal. A worker stopped (SIGSTOP, a stall) past it must assume the
        # sweep gave the job to another worker.
        self.valid_until = claimed_at + self.lease_seconds
        self.next_renewal = claimed_at + self.lease_seconds / 3
        self.lost = threading.Event()
        # Held during a renewal; the job's end takes it, so no renewal runs after the job ended.
        self._renewing = threading.Lock()
        self._ended = False

    def __enter__(self) -> Heartbeat:
        self.wc.leases.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wc.leases.remove(self)
        with self._renewing:
            self._ended = True

    def held(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.valid_until

    def renew(self) -> bool:
        """Extend the lease once (the keeper calls this when it is due); False once it is lost or ended."""
        with self._renewing:
            if self._ended or self.lost.is_set():
                return False
            started = time.monotonic()
            try:
                held = self.wc.db.autocommit(
                    lambda s: jobs.renew_lease(s, self.job_id, self.holder, self.lease_seconds)
                )
            except Exception as exc:  # the database blipped: try again next beat; the lease may lapse
                log.warning("job %s: lease renewal failed: %s", self.job_id, type(exc).__name__)
                self.next_renewal = started + self.lease_seconds / 3
                return True
            if held:
                self.valid_until = started + self.lease_seconds
                self.next_renewal = started + self.lease_seconds / 3
                return True
            log.warning("job %s: lease lost; this worker will not finish the job", self.job_id)
            self.lost.set()
            return False


class LeaseKeeper:
    """One thread per worker process that renews the lease of every job the process is running.

    A thread per job cost a thread start and join on every job, each a wait for the GIL among
    the pool's busy threads (bench/throughput.py); one keeper renews them all when they are due.
    """

    def __init__(self) -> None:
        self._beats: dict[int, Heartbeat] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, beat: Heartbeat) -> None:
        with self._wake:
            idle = not self._beats
            self._beats[id(beat)] = beat
            if self._thread is None or not self._thread.is_alive():
                self._stopped = False
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
            elif idle:
                # The keeper sleeps until woken when it holds nothing. Otherwise it is due to wake
                # for an older lease, which is renewed before this one (every lease has one length).
                self._wake.notify()

    def remove(self, beat: Heartbeat) -> None:
        with self._wake:
            self._beats.pop(id(beat), None)

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopped:
                    return
                now = time.monotonic()
                due = [b for b in self._beats.values() if b.next_renewal <= now]
                if not due:
                    soonest = min((b.next_renewal for b in self._beats.values()), default=None)
                    self._wake.wait(None if soonest is None else soonest - now)
                    continue
            for beat in due:
                if not beat.renew():
                    self.remove(beat)


def _run_job(task: Task, job_id: str, fn: JobFn) -> str:
    wc = worker_context(task.app)

    def retry(exc: TransientError) -> None:
        raise task.retry(countdown=min(2**task.request.retries, 30), exc=None) from None

    retries_left = task.request.retries < (task.max_retries or 0)
    return execute(wc, job_id, lease_holder(task, wc), fn, retry=retry if retries_left else None)


def execute(
    wc: WorkerContext, job_id: str, holder: str, fn: JobFn, *, retry: Callable[[TransientError], None] | None
) -> str:
    """Claim the job for ``holder``, run ``fn`` under its lease, record the outcome.

    ``retry`` (when a retry is left): called after a transient error has given the job back to
    ``queued``; a task raises Celery's retry there, a split job running one of its parts inline
    (app/tasks/split.py) lets the part wait for its next taker. The outcome is returned.
    """
    settings = wc.settings
    claimed_at = time.monotonic()
    job = wc.db.autocommit(
        lambda s: jobs.claim(s, job_id, holder, settings.job_lease_seconds, max_attempts=settings.job_max_attempts)
    )
    if job is None:
        return "skipped"  # finished, held by a live lease elsewhere, or out of attempts
    view = JobView(job.id, job.org_id, job.kind, dict(job.params or {}), job.attempts, parent_id=job.parent_id)
    with Heartbeat(wc, job_id, holder, claimed_at) as lease:
        view = replace(view, lease=lease)
        try:
            try:
                result = fn(wc, view)
            except (OperationalError, InterfaceError) as exc:
                # The database went away under the job: worth another try once it is back.
                raise TransientError("database_unavailable", "the database was unavailable") from exc
        except TransientError as exc:
            if retry is not None and view.attempts < settings.job_max_attempts:
                released = wc.db.autocommit(lambda s: jobs.release(s, job_id, holder))
                if not released:
                    return "lost"
                log.warning("job %s (%s): transient %s, retrying", job_id, view.kind, exc.code)
                retry(exc)
                return JobStatus.QUEUED
            return _fail(wc, job_id, holder, exc.code, exc.message)
        except JobLostError:
            return _not_finished(job_id)
        except WorkerError as exc:
            # Every expected failure (the job's own, a model call, MCP, egress, the resolver).
            return _fail(wc, job_id, holder, exc.code, exc.message)
        except SoftTimeLimitExceeded:
            return _fail(wc, job_id, holder, "timeout", "the job ran out of time")
        except Exception as exc:
            # The type name only: messages of unexpected errors may quote data.
            log.error("job %s (%s) crashed: %s", job_id, view.kind, type(exc).__name__)
            return _fail(wc, job_id, holder, "internal_error", "the job failed unexpectedly")
        finished = wc.db.autocommit(lambda s: jobs.mark_succeeded(s, job_id, result, lease=holder))
    return JobStatus.SUCCEEDED if finished else _not_finished(job_id)


def _fail(wc: WorkerContext, job_id: str, holder: str, code: str, message: str) -> str:
    finished = wc.db.autocommit(lambda s: jobs.mark_failed(s, job_id, code, message, lease=holder))
    return JobStatus.FAILED if finished else _not_finished(job_id)


def _not_finished(job_id: str) -> str:
    # The job was no longer ours: the web tier failed it (a reveal that timed out), or our
    # lease lapsed and another worker holds it now. Its outcome is not ours to record.
    log.warning("job %s: not held by this worker any more; outcome discarded", job_id)
    return "lost"


def batch_size_param(job: JobView, default: int, maximum: int) -> int:
    """The job's ``batch_size`` param (1..maximum), or ``default``; invalid_params otherwise."""
    batch_size = job.params.get("batch_size", default)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= maximum:
        raise JobFailedError("invalid_params", f"batch_size must be an integer in 1..{maximum}")
    return batch_size


def worker_keyring(ctx: WorkerContext) -> Any:
    """The worker's private keyring, read from its file now (a rotated key is seen at once)."""
    from app.secrets.keyring import Keyring, KeyringError

    if ctx.settings.private_keys_file is None:
        raise JobFailedError("keyring_unavailable", "this worker has no keyring (LATCHKEY_PRIVATE_KEYS_FILE)")
    try:
        return Keyring.load(ctx.settings.private_keys_file)
    except KeyringError as exc:
        raise JobFailedError("keyring_unavailable", str(exc)) from None


# Time limits ---------------------------------------------------------------------------------
#
# Every task declares its limits here, soft and hard together (a soft limit above the hard
# one makes Celery refuse to send the task, which is how beat broke: issue #14). The soft
# limit raises SoftTimeLimitExceeded in the task; the hard limit kills it HARD_GRACE_SECONDS
# later. No task may run longer than LONGEST_TIME_LIMIT: the broker's visibility timeout
# (when an unacknowledged message is delivered again) sits just above the longest hard limit.

HARD_GRACE_SECONDS = 10
LONGEST_TIME_LIMIT = 3000
VISIBILITY_TIMEOUT = LONGEST_TIME_LIMIT + HARD_GRACE_SECONDS + 60


def time_limits(soft_seconds: int) -> dict[str, int]:
    """Celery options for a task that should finish within ``soft_seconds``."""
    if not 0 < soft_seconds <= LONGEST_TIME_LIMIT:
        raise ValueError(f"a task's time limit must be in 1..{LONGEST_TIME_LIMIT} s")
    return {"soft_time_limit": soft_seconds, "time_limit": soft_seconds + HARD_GRACE_SECONDS}


def periodic_task(name: str, *, time_limit: int) -> Callable[[Callable[..., Any]], Any]:
    """Declare a beat task (bound, ``acks_late``) over ``fn(self)``, with its time limits."""
    decorator: Callable[[Callable[..., Any]], Any] = shared_task(
        name=name, bind=True, acks_late=True, **time_limits(time_limit)
    )
    return decorator


def job_task(name: str, *, time_limit: int = 120, max_retries: int = 3) -> Callable[[JobFn], Any]:
    """Declare a job task: ``@job_task(TaskName.VALIDATE_SERVER)`` over ``fn(ctx, job)``."""

    def decorator(fn: JobFn) -> Any:
        def task(self: Task, job_id: str) -> str:
            return run_job(self, job_id, fn)

        # Set before shared_task: the proxy it returns would build Celery's default app on first use.
        task.__doc__ = fn.__doc__
        return shared_task(
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=max_retries,
            **time_limits(time_limit),
        )(task)

    return decorator
