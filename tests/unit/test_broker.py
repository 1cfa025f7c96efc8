"""The broker differences: transport and publish options per broker, and the consumer-timeout check."""

from __future__ import annotations

import pytest

from app import broker
from app.config import load_settings
from app.tasks.runtime import HARD_GRACE_SECONDS, LONGEST_TIME_LIMIT, VISIBILITY_TIMEOUT
from app.worker import make_celery

REDIS = "redis://127.0.0.1:6379/3"
RABBIT = "amqp://guest:guest@rabbit.internal:5672/latchkey"
LONGEST = LONGEST_TIME_LIMIT + HARD_GRACE_SECONDS


@pytest.mark.parametrize(
    ("url", "amqp"), [(REDIS, False), ("rediss://r:6380/0", False), (RABBIT, True), ("amqps://h//", True)]
)
def test_the_broker_kind_is_read_from_the_url_scheme(url: str, amqp: bool) -> None:
    assert broker.is_amqp(url) is amqp


def test_redis_gets_the_visibility_timeout_and_rabbitmq_publisher_confirms_with_bounded_waits() -> None:
    on_redis = make_celery(load_settings({}, env="test", broker_url=REDIS))
    on_rabbit = make_celery(load_settings({}, env="test", broker_url=RABBIT))
    try:
        assert on_redis.conf.broker_transport_options == {"visibility_timeout": VISIBILITY_TIMEOUT}
        assert on_rabbit.conf.broker_transport_options == {"confirm_publish": True}
        # RabbitMQ 3.12+: the worker's consumer asks for the same timeout Redis uses (older
        # brokers ignore the argument); the queue is Celery's default one otherwise.
        assert on_redis.conf.task_queues is None
        [queue] = on_rabbit.conf.task_queues
        assert (queue.name, queue.exchange.name, queue.exchange.type, queue.routing_key) == (
            ("latchkey",) * 2 + ("direct", "latchkey")
        )
        assert queue.consumer_arguments == {"x-consumer-timeout": VISIBILITY_TIMEOUT * 1000}
        for app in (on_redis, on_rabbit):
            # A channel the broker closed restarts the consumer instead of stopping the worker, and
            # running tasks are not cancelled on a connection loss (their leases guard them).
            assert app.conf.broker_channel_error_retry is True
            assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False
            assert app.conf.broker_heartbeat == 60
    finally:
        on_redis.close()
        on_rabbit.close()
    assert broker.publish_options(REDIS) == {}
    assert broker.publish_options(RABBIT) == {"timeout": 3.0, "confirm_timeout": 3.0}


def test_a_rabbitmq_worker_is_warned_unless_the_declared_consumer_timeout_exceeds_the_longest_limit() -> None:
    default = broker.consumer_timeout_problem(load_settings({}, broker_url=RABBIT), LONGEST)
    assert default is not None and "(1800 s, RabbitMQ's default)" in default
    assert "consumer_timeout = 3600000" in default and "LATCHKEY_BROKER_CONSUMER_TIMEOUT_SECONDS=3600" in default
    short = broker.consumer_timeout_problem(
        load_settings({}, broker_url=RABBIT, broker_consumer_timeout_seconds=LONGEST), LONGEST
    )
    assert short is not None and f"({LONGEST} s, declared)" in short
    env = {"LATCHKEY_BROKER_URL": RABBIT, "LATCHKEY_BROKER_CONSUMER_TIMEOUT_SECONDS": "3600"}
    assert broker.consumer_timeout_problem(load_settings(env), LONGEST) is None
    disabled = load_settings({}, broker_url=RABBIT, broker_consumer_timeout_seconds=0)
    assert broker.consumer_timeout(disabled) is None and broker.consumer_timeout_problem(disabled, LONGEST) is None
    # A broker that applies the consumer's own timeout argument needs nothing declared.
    old = broker.consumer_timeout_problem(load_settings({}, broker_url=RABBIT), LONGEST, "3.10.8")
    assert old is not None and old.startswith("RabbitMQ 3.10.8 applies only the node's consumer_timeout")
    for version in ("3.12.0", "3.13.7", "4.1.0"):
        assert broker.consumer_timeout_problem(load_settings({}, broker_url=RABBIT), LONGEST, version) is None
    assert broker.honours_consumer_timeout_argument("3.11.9") is False
    assert broker.honours_consumer_timeout_argument("garbage") is False
    # Redis has no consumer timeout: its visibility timeout is ours, set above the longest limit.
    assert broker.consumer_timeout_problem(load_settings({}, redis_url=REDIS), LONGEST) is None


def test_a_redis_broker_channel_keeps_one_client_for_its_commands(redis_url: str) -> None:
    """Kombu's channel built a redis.Redis per command (three a job); ours keeps one per pool."""
    app = make_celery(load_settings({}, env="test", broker_url=redis_url))
    on_rabbit = make_celery(load_settings({}, env="test", broker_url=RABBIT))
    try:
        assert on_rabbit.conf.broker_transport is None  # the URL's own transport (py-amqp)
        with app.connection_for_write() as conn:
            assert isinstance(conn.transport, broker.RedisTransport)
            channel = conn.default_channel
            assert isinstance(channel, broker.RedisChannel)
            first = channel._create_client()
            assert channel._create_client() is first
            with channel.conn_or_acquire() as client:
                assert client is first and client.ping()
            channel._pool = None  # the pool rebuilt (as after a disconnect): a client of the new pool
            assert channel._create_client() is not first
            assert channel._create_client().connection_pool is channel.pool
            assert channel._create_client(asynchronous=True) is not channel._create_client(asynchronous=True)
    finally:
        app.close()
        on_rabbit.close()
