"""What differs between the two brokers (Redis, RabbitMQ): transport options, publishing, redelivery timeouts.

Both brokers give the same guarantees to the jobs table (docs/workers.md, "Brokers: Redis or
RabbitMQ"): a message is acknowledged only when its task ends, a refused publish is seen by the
publisher, and an unacknowledged message is never handed to a second worker while its task may
still be running on the first one, except when that worker's connection is gone, and then the
job's lease (not the broker) decides who runs it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from app.config import Settings

# Kombu's names for the AMQP 0-9-1 transport (py-amqp).
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
# RabbitMQ's own default `consumer_timeout` (3.8.15 and later): 30 minutes.
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT = 1800
# RabbitMQ honours a consumer's own `x-consumer-timeout` argument from 3.12 (3.11.15 by its
# docs); older brokers ignore it and only the node-wide `consumer_timeout` applies.
PER_CONSUMER_TIMEOUT_SINCE = (3, 12)
# The longest a publish may wait for the broker's confirm (RabbitMQ) or its socket (both): a web
# request that publishes answers 503 after this rather than hang on a blocked broker.
PUBLISH_TIMEOUT_SECONDS = 3.0


def is_amqp(url: str) -> bool:
    """Whether ``url`` names a RabbitMQ (AMQP 0-9-1) broker rather than Redis."""
    return urlsplit(url).scheme.lower() in AMQP_SCHEMES


class RedisChannel(kombu_redis.Channel):
    """Kombu's Redis channel, keeping one client for the commands it runs outside its event loop.

    Kombu builds a new ``redis.Redis`` for every such command: each message's QoS bookkeeping
    when it is delivered and again when it is acknowledged, every publish, every event. redis-py's
    constructor fills its response-callback table each time, which a worker profile put at a
    fifth of a no-op job's CPU (three clients a job; bench/README.md, ``bench.throughput``). A
    client holds no connection of its own (it takes one from the channel's pool per command) and
    is safe to share between threads, so one per pool serves every caller of the channel.
    """

    _sync_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class RedisTransport(kombu_redis.Transport):
    """Kombu's Redis transport with :class:`RedisChannel` (``broker_transport`` for ``redis://``)."""

    Channel = RedisChannel


def transport(url: str) -> str | None:
    """Celery's ``broker_transport``: ours for a plain ``redis://`` broker, else the URL's own."""
    return f"{__name__}:RedisTransport" if urlsplit(url).scheme.lower() == "redis" else None


def transport_options(url: str, *, visibility_timeout: int) -> dict[str, Any]:
    """Celery's ``broker_transport_options`` for this broker.

    Redis: ``visibility_timeout``, when an unacknowledged message is delivered again (the broker
    has no notion of a consumer; it is a timer). RabbitMQ: publisher confirms, so a message the
    broker refuses (a queue length limit, a resource alarm, a closed channel) raises at the
    publisher instead of being dropped without a word; RabbitMQ redelivers an unacknowledged
    message when its consumer's connection closes, and its consumer timeout is the broker's
    setting (``consumer_timeout_problem``).
    """
    if is_amqp(url):
        return {"confirm_publish": True}
    return {"visibility_timeout": visibility_timeout}


def task_queues(url: str, queue: str, *, visibility_timeout: int) -> list[Queue] | None:
    """Celery's ``task_queues``: on RabbitMQ the queue whose consumers ask for their own timeout.

    A worker's consumer asks RabbitMQ (3.12+) not to take a message back before the same
    ``visibility_timeout`` Redis uses, whatever the node's ``consumer_timeout``. None on Redis:
    Celery's default queue (the same exchange, type and routing key) is used as before.
    """
    if not is_amqp(url):
        return None
    exchange = Exchange(queue, type="direct")  # type: ignore[no-untyped-call]
    arguments = {"x-consumer-timeout": visibility_timeout * 1000}
    return [Queue(queue, exchange, routing_key=queue, consumer_arguments=arguments)]  # type: ignore[no-untyped-call]


def honours_consumer_timeout_argument(server_version: str | None) -> bool:
    """Whether a RabbitMQ of this version applies a consumer's ``x-consumer-timeout``."""
    try:
        parts = tuple(int(p) for p in (server_version or "").split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= PER_CONSUMER_TIMEOUT_SINCE


def publish_options(url: str) -> dict[str, Any]:
    """Extra ``send_task`` options: bounded waits for the socket and the broker's confirm (RabbitMQ)."""
    if is_amqp(url):
        return {"timeout": PUBLISH_TIMEOUT_SECONDS, "confirm_timeout": PUBLISH_TIMEOUT_SECONDS}
    return {}


def consumer_timeout(settings: Settings) -> int | None:
    """The RabbitMQ consumer timeout this deployment declares (seconds), None when it is disabled."""
    declared = settings.broker_consumer_timeout_seconds
    if declared is None:
        return RABBITMQ_DEFAULT_CONSUMER_TIMEOUT
    return declared or None


def consumer_timeout_problem(
    settings: Settings, longest_hard_limit: int, server_version: str | None = None
) -> str | None:
    """A warning when RabbitMQ may take a message back while its task may still be running.

    RabbitMQ closes the channel of a consumer that holds a message unacknowledged for longer
    than its ``consumer_timeout``, and delivers the message again. With ``acks_late`` the
    message of a task is held for the task's whole run, so the timeout must exceed the longest
    hard time limit. A broker that honours the consumer's own argument (``task_queues``) is
    fine; for an older one the node's setting cannot be read over AMQP, so the deployment
    declares it (``LATCHKEY_BROKER_CONSUMER_TIMEOUT_SECONDS``, unset meaning RabbitMQ's default).
    """
    if not is_amqp(settings.effective_broker_url) or honours_consumer_timeout_argument(server_version):
        return None
    timeout = consumer_timeout(settings)
    if timeout is None or timeout > longest_hard_limit:
        return None
    declared = "RabbitMQ's default" if settings.broker_consumer_timeout_seconds is None else "declared"
    return (
        f"RabbitMQ {server_version or '(version unknown)'} applies only the node's consumer_timeout, and "
        f"the broker's consumer_timeout ({timeout} s, {declared}) is not above the longest task "
        f"time limit ({longest_hard_limit} s): a longer task's message is taken back and delivered "
        "again while it runs (its job lease keeps the copy from running it twice). Set "
        f"consumer_timeout = {(longest_hard_limit + 590) * 1000} (ms) in rabbitmq.conf and "
        f"LATCHKEY_BROKER_CONSUMER_TIMEOUT_SECONDS={longest_hard_limit + 590} (docs/workers.md)"
    )
