"""The worker entry: ``celery -A app.worker worker`` / ``beat`` / ``flower``.

``make_celery(settings)`` builds a Celery app from settings (the web tier and the CLI use it
to publish, the dev server to run a worker thread). The process's own app, ``celery``, is
built from the environment only when Celery's command line asks this module for it: importing
``app.worker`` reads no environment and opens no connection.

Task messages carry ids only (JSON serializer, never pickle), are acknowledged after the
task finishes (``acks_late``) so a crashed worker's job is redelivered, and are bounded
by time limits that every task declares (soft and hard together, app/tasks/runtime.py).
The tasks themselves are declared with ``shared_task`` in ``app.tasks.*`` and bind to
whichever app the process built.

Monitoring: task events are on, so ``celery -A app.worker flower`` works (see
docs/observability.md). Celery's logging signals hand the worker's handlers to
``app.observability.logs`` (our format, secret values redacted); task signals feed the worker metrics.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import sys
import threading
from typing import Any

from billiard.process import current_process
from celery import Celery, signals

from app import broker, extensions
from app.config import ConfigError, Settings, load_settings
from app.jobs.names import TaskName
from app.secrets.checks import check_worker_keys
from app.tasks.runtime import HARD_GRACE_SECONDS, LONGEST_TIME_LIMIT, VISIBILITY_TIMEOUT

# Modules whose tasks every worker registers: app/tasks/ and the extensions' (app/extensions.py).
TASK_MODULES = [
    "app.tasks.system",
    "app.tasks.secrets",
    "app.tasks.mcp",
    "app.tasks.agents",
    "app.tasks.keys",
    "app.tasks.split",
    *extensions.module_names("tasks"),
]

log = logging.getLogger("latchkey.worker")


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """What beat sends, and how often (seconds): every interval is a LATCHKEY_* setting."""
    return {
        "requeue-stuck-jobs": {"task": TaskName.REQUEUE_STUCK, "schedule": settings.job_requeue_seconds},
        "sweep-job-leases": {"task": TaskName.SWEEP_LEASES, "schedule": settings.job_sweep_seconds},
        "replay-cache-invalidations": {
            "task": TaskName.REPLAY_INVALIDATIONS,
            "schedule": settings.invalidation_replay_seconds,
        },
        "refresh-mcp-tools": {"task": TaskName.REFRESH_TOOLS, "schedule": settings.mcp_refresh_seconds},
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (a producer, or a worker once it runs)."""
    celery = Celery("latchkey", set_as_current=False, include=TASK_MODULES)
    celery.conf.update(
        broker_url=settings.effective_broker_url,
        # The result backend is internal plumbing; job state lives in the jobs table.
        result_backend=settings.redis_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Every Latchkey task declares its soft and hard limit together
        # (app.tasks.runtime.time_limits); these defaults only bound Celery's built-in tasks.
        task_time_limit=300,
        task_soft_time_limit=270,
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        # Redis: an unacknowledged message is delivered again after VISIBILITY_TIMEOUT, just above
        # the longest hard time limit, so a message is never redelivered while its task may still
        # be running. RabbitMQ: publisher confirms (a refused publish raises); its redelivery
        # timer is the consumer timeout, which the worker's consumer asks to be the same bound
        # (task_queues below; 3.12+) and which an older broker's node setting must exceed
        # (checked at worker start). Both in app/broker.py.
        # Recovering a dead worker's job is the lease sweep's business, not these timeouts'.
        broker_transport_options=broker.transport_options(
            settings.effective_broker_url, visibility_timeout=VISIBILITY_TIMEOUT
        ),
        # Redis: kombu's transport with a channel that keeps its client (app/broker.py).
        broker_transport=broker.transport(settings.effective_broker_url),
        # When the broker connection drops, RabbitMQ hands the running tasks' messages to other
        # workers; the tasks keep running here and their leases turn the copies away (skipped).
        # Cancelling them instead (Celery's coming default) would throw away work nobody else
        # may start before the lease lapses.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A channel the broker closed (RabbitMQ's consumer timeout, a queue deleted under the
        # consumer) restarts the consumer like a lost connection does. Celery's default treats
        # it as unrecoverable and shuts the worker down: every worker running a long job would
        # stop when the consumer timeout fired (found by tests/e2e/workers/test_brokers.py).
        broker_channel_error_retry=True,
        # Celery keeps handlers already on the root logger; the ones it adds are adopted by
        # the after_setup_* signals below (our format and the redacting filter).
        worker_hijack_root_logger=False,
        # Events for Flower / `celery events`: task names, ids and arguments (job ids only).
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=settings.queue,
        task_queues=broker.task_queues(
            settings.effective_broker_url, settings.queue, visibility_timeout=VISIBILITY_TIMEOUT
        ),
        broker_connection_timeout=3,
        # RabbitMQ: AMQP heartbeats on the worker's consuming connection (producers send none),
        # so a worker on a half-open connection (a broker restart behind a NAT, a dropped
        # route) notices within two intervals and reconnects instead of waiting for messages
        # that never come; the broker likewise requeues a vanished worker's messages. RabbitMQ's
        # own default; the Redis transport has no heartbeats.
        broker_heartbeat=60,
        beat_schedule=beat_schedule(settings),
    )
    celery.conf["latchkey_settings"] = settings
    return celery


@functools.cache
def process_app() -> Celery:
    """This process's app, built once from the environment (the worker, beat or Flower process)."""
    return make_celery(load_settings())


def __getattr__(name: str) -> Celery:
    # `celery -A app.worker` looks up `app.worker.celery`: the process entry, and the only
    # place the environment is read for a worker.
    if name == "celery":
        return process_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Worker process wiring ------------------------------------------------------------------------
#
# Celery's signals are process-wide. The worker_init handlers act only for an app built by
# make_celery (one that carries its settings); the others only run inside a worker or a task.


def _settings_of(sender: Any) -> Settings | None:
    app = getattr(sender, "app", None)
    return app.conf.get("latchkey_settings") if app is not None else None


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _start_worker_metrics(sender: Any = None, **_: Any) -> None:
    settings = _settings_of(sender)
    if settings is not None and settings.worker_metrics_port is not None:
        from app.observability.metrics import start_worker_metrics

        start_worker_metrics(settings.worker_metrics_port)


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _check_worker_config(sender: Any = None, **_: Any) -> None:
    # A production worker without its keyring (or with dev keys) must not start.
    settings = _settings_of(sender)
    if settings is not None:
        try:
            check_worker_keys(settings)
        except ConfigError as exc:
            # Celery swallows exceptions raised by signal handlers; SystemExit is not swallowed.
            sys.stderr.write(f"latchkey worker: {exc}\n")
            raise SystemExit(2) from None


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _check_broker_timeouts(sender: Any = None, **_: Any) -> None:
    # Once the worker is up, so the line goes through its log handlers. A warning, not a
    # refusal: the job leases keep a redelivered copy from running the job twice (tested), so
    # what a too-short consumer timeout costs is a consumer restart, not correctness.
    settings = _settings_of(sender)
    if settings is None:
        return
    problem = broker.consumer_timeout_problem(
        settings, LONGEST_TIME_LIMIT + HARD_GRACE_SECONDS, _server_version(sender)
    )
    if problem:
        log.warning("broker: %s", problem)


def _server_version(consumer: Any) -> str | None:
    """The broker's version as it announced itself on connecting (AMQP only)."""
    props = getattr(getattr(getattr(consumer, "connection", None), "connection", None), "server_properties", None)
    version = props.get("version") if isinstance(props, dict) else None
    return version.decode() if isinstance(version, bytes) else version


# The garbage collector and the startup heap ----------------------------------------------------
#
# A worker's startup leaves a few hundred thousand long-lived objects (Celery, kombu, SQLAlchemy,
# the app's modules and tables), and every full collection walks them all again, although none of
# them ever becomes garbage. A batch job allocates rows by the thousand and triggers full
# collections as it goes: in a backfill that was ~7% of the worker's time (bench/README.md). Once
# a process is ready, its startup objects are moved to the permanent generation (``gc.freeze``),
# which collections skip; what the tasks allocate is collected as before.


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _freeze_worker_heap(**_: Any) -> None:
    # The worker's own process (where the threads and solo pools run tasks), once it consumes.
    # Sent by Celery's worker program only (and `latchkey dev`'s worker thread), never by an
    # embedded test worker, whose host keeps collecting as it always did.
    freeze_startup_heap()


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _freeze_pool_child_heap(**_: Any) -> None:
    # A prefork child, once it is set up. The solo pool sends this in the worker's own process,
    # before the worker is ready: that process freezes on worker_ready instead.
    if current_process().name != "MainProcess":
        freeze_startup_heap()


@signals.after_setup_logger.connect  # type: ignore[untyped-decorator]
@signals.after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _adopt_log_handlers(logger: Any = None, **_: Any) -> None:
    from app.observability.logs import adopt_handlers

    adopt_handlers(logger)


@signals.task_prerun.connect  # type: ignore[untyped-decorator]
def _task_prerun(task_id: str | None = None, **_: Any) -> None:
    from app.observability import metrics

    metrics.task_started(task_id)


@signals.task_postrun.connect  # type: ignore[untyped-decorator]
def _task_postrun(
    task_id: str | None = None, task: Any = None, retval: Any = None, state: str | None = None, **_: Any
) -> None:
    from app.observability import metrics

    metrics.task_finished(task_id, getattr(task, "name", None), state, retval)


# Pool children and SIGTERM ---------------------------------------------------------------------
#
# A process manager stopping the worker signals every process of it: systemd its control group,
# Heroku the dyno, honcho and foreman the process group, the prefork pool's children included.
# Celery's main process answers SIGTERM with a warm shutdown (finish the running tasks, then
# stop the pool), but a child died of the same SIGTERM at once, mid-task: the task was lost and
# its job stayed running until the lease sweep noticed. So in a pool child SIGTERM is taken by a
# thread that looks at who sent it: from the worker's own main process (a cold shutdown, a hard
# time limit) the child ends as it always did; from anyone else the child carries on, and the
# main process's warm shutdown stops it once its task is done.


def _watch_sigterm(main_thread: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == os.getppid():
            # The worker wants this child gone: billiard's SIGQUIT handler is its SIGTERM one.
            signal.pthread_kill(main_thread, signal.SIGQUIT)


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _pool_child_takes_sigterm_from_its_worker_only(**_: Any) -> None:
    # Sent in each prefork child, and by the solo pool in the worker's own main process (where
    # SIGTERM must keep starting the warm shutdown, and where blocking it would be inherited by
    # every process it spawns: an embedded or test worker's host could no longer be stopped).
    # So only a pool child takes this path. Blocked here, SIGTERM stays blocked in every thread
    # the child starts, so only the watcher receives it. Where the sender cannot be known (no
    # sigwaitinfo: macOS), the child keeps Celery's behaviour.
    if not hasattr(signal, "sigwaitinfo") or current_process().name == "MainProcess":
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_watch_sigterm, args=(threading.main_thread().ident,), name="sigterm-watch", daemon=True
    ).start()
