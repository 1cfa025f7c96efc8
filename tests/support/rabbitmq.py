"""Test-only RabbitMQ surgery through ``rabbitmqctl``: policies, and a short consumer timeout for one queue.

RabbitMQ 3.10 has no per-queue consumer timeout (the ``consumer-timeout`` policy and the
``x-consumer-timeout`` argument came with 3.12): each channel copies the node's
``consumer_timeout`` when it opens, and checks it every ``channel_tick_interval``. So the test
rewrites the copy held by the channels consuming one queue of its own; every other channel on
the node (other test sessions, the CI's other lane) keeps the node's setting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.support.backends import rabbitmq_eval, rabbitmqctl

# Where 3.10's rabbit_channel keeps the timeout: the gen_server2 state's 4th element is the #ch
# record, whose 2nd is the #conf record; #conf's consumer_timeout is its 17th field (element 18)
# and virtual_host its 10th (element 11). The expression checks the record names, the vhost and
# the node-wide value before writing, so a different layout fails the test instead of corrupting
# a channel.
_SHORTEN = """
VHost = <<"{vhost}">>, Ms = {ms},
{{ok, Default}} = application:get_env(rabbit, consumer_timeout),
{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(VHost, queue, <<"{queue}">>)),
Pids = lists:usort([element(1, C) || C <- rabbit_amqqueue:consumers(Q)]),
Set = fun(GS) ->
    Ch = element(4, GS), Conf = element(2, Ch),
    ch = element(1, Ch), conf = element(1, Conf), VHost = element(11, Conf), Default = element(18, Conf),
    setelement(4, GS, setelement(2, Ch, setelement(18, Conf, Ms)))
end,
[sys:replace_state(P, Set) || P <- Pids],
length(Pids).
"""

_SET_TICK = """
{{ok, Tick}} = application:get_env(rabbit, channel_tick_interval),
ok = application:set_env(rabbit, channel_tick_interval, {tick}),
Tick.
"""


@contextmanager
def short_channel_tick(milliseconds: int) -> Iterator[None]:
    """Channels opened meanwhile check their consumer timeout every ``milliseconds`` (node default: 60 s).

    A channel arms its tick when it starts consuming and re-arms it with the interval of that
    moment, so it must be short before the consumer starts. Only how often a check runs
    changes, for any channel on the node; no channel's timeout does. Restored afterwards.
    """
    before = int(rabbitmq_eval(_SET_TICK.format(tick=milliseconds)))
    try:
        yield
    finally:
        rabbitmq_eval(f"application:set_env(rabbit, channel_tick_interval, {before}).")


def shorten_consumer_timeout(vhost: str, queue: str, milliseconds: int) -> int:
    """Give the channels now consuming ``queue`` a consumer timeout of ``milliseconds``; how many there were."""
    return int(rabbitmq_eval(_SHORTEN.format(vhost=vhost, queue=queue, ms=milliseconds)))


@contextmanager
def policy(vhost: str, name: str, pattern: str, definition: dict[str, Any]) -> Iterator[None]:
    """A queue policy in ``vhost`` for the duration of the block."""
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", name, pattern, json.dumps(definition))
    try:
        yield
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, name)


def connection_heartbeats(vhost: str) -> list[int]:
    """The negotiated heartbeat (seconds, 0 = none) of every client connection to ``vhost``."""
    rows = rabbitmqctl("list_connections", "--no-table-headers", "vhost", "timeout").splitlines()
    return [int(t) for v, t in (row.split("\t") for row in rows if row.strip()) if v == vhost]
