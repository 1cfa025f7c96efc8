"""What every job task shares: the worker's resources and the job life cycle.

A task receives only a job id. It claims the row (queued -> running; a finished job is
left alone, so a redelivered message changes nothing), runs, and records succeeded or
failed with a stable error code. Transient errors are retried with exponential backoff;
everything else fails the job at once with a message that carries no secret.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError

from app.config import Settings
from app.db import Database
from app.jobs import service as jobs
from app.logs import reset_job_id, set_job_id

log = logging.getLogger("latchkey.worker")


class JobFailedError(Exception):
    """A job ends failed with this stable code and a safe message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TransientError(Exception):
    """Worth retrying (a dependency blipped); after the last retry the job fails with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class JobView:
    id: str
    org_id: str | None
    kind: str
    params: dict[str, Any]
    attempts: int


class WorkerContext:
    """Per-process resources of a worker: settings, database, keyring, Redis, resolver."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database()
        self.db.configure(settings.database_url)
        self.hostname = socket.gethostname()
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
        if self._resolver is not None:
            self._resolver.close()
        self.db.dispose()


_contexts: dict[int, WorkerContext] = {}
_contexts_lock = threading.Lock()


def worker_context(app: Any) -> WorkerContext:
    with _contexts_lock:
        ctx = _contexts.get(id(app))
        if ctx is None:
            ctx = _contexts[id(app)] = WorkerContext(app.conf["latchkey_settings"])
        return ctx


JobFn = Callable[[WorkerContext, JobView], dict[str, Any] | None]


def run_job(task: Task, job_id: str, fn: JobFn) -> str:
    token = set_job_id(job_id)  # every log line of this job carries its id
    try:
        return _run_job(task, job_id, fn)
    finally:
        reset_job_id(token)


def _run_job(task: Task, job_id: str, fn: JobFn) -> str:
    wc = worker_context(task.app)
    with wc.db.session() as s:
        job = jobs.claim(s, job_id)
        if job is None:
            return "skipped"
        view = JobView(job.id, job.org_id, job.kind, dict(job.params or {}), job.attempts)
    try:
        try:
            result = fn(wc, view)
        except (OperationalError, InterfaceError) as exc:
            # The database went away under the job: worth another try once it is back.
            raise TransientError("database_unavailable", "the database was unavailable") from exc
    except TransientError as exc:
        if task.request.retries < (task.max_retries or 0):
            log.warning("job %s (%s): transient %s, retrying", job_id, view.kind, exc.code)
            raise task.retry(countdown=min(2**task.request.retries, 30), exc=None) from None
        _fail(wc, job_id, exc.code, exc.message)
        return "failed"
    except JobFailedError as exc:
        _fail(wc, job_id, exc.code, exc.message)
        return "failed"
    except SoftTimeLimitExceeded:
        _fail(wc, job_id, "timeout", "the job ran out of time")
        return "failed"
    except Exception as exc:
        # The type name only: messages of unexpected errors may quote data.
        log.error("job %s (%s) crashed: %s", job_id, view.kind, type(exc).__name__)
        _fail(wc, job_id, "internal_error", "the job failed unexpectedly")
        return "failed"
    with wc.db.session() as s:
        jobs.mark_succeeded(s, job_id, result)
    return "succeeded"


def _fail(wc: WorkerContext, job_id: str, code: str, message: str) -> None:
    with wc.db.session() as s:
        jobs.mark_failed(s, job_id, code, message)


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


def job_task(name: str, *, time_limit: int = 120, max_retries: int = 3) -> Callable[[JobFn], Any]:
    """Declare a job task: ``@job_task("mcp.validate_server")`` over ``fn(ctx, job)``."""

    def decorator(fn: JobFn) -> Any:
        @shared_task(  # type: ignore[untyped-decorator]
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            max_retries=max_retries,
            time_limit=time_limit + 10,
            soft_time_limit=time_limit,
        )
        def task(self: Task, job_id: str) -> str:
            return run_job(self, job_id, fn)

        task.__doc__ = fn.__doc__
        return task

    return decorator
