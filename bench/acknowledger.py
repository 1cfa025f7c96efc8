"""``python -m bench.acknowledger REDIS_URL CHANNEL [PAUSE]``: the least a subscribed worker can do per edit.

The floor of ``bench.many_workers``: a process that subscribes to the deployment's invalidation
channel and answers every message the way a worker's resolver does (``RPUSH`` + ``EXPIRE`` of
the message's acknowledgement list, in one pipeline: ``app.secrets.resolver``), and does nothing
else of Latchkey's: no resolver, no cache, no Celery. With ``PAUSE`` (seconds) a second thread
loops as the benchmark's resolve loops do, ``PAUSE`` apart, each turn a dict lookup where a loop
resolves: the same wake-ups on the same cores, without the resolver. Edits timed against K of
these show what waiting for K acknowledgements (and K such loops) costs an edit on this machine
whatever the workers run; the rest of what K real workers cost an edit is theirs.

It runs until killed. Its command line names this module, so ``bench.common`` counts its CPU
as a worker's.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import redis

from app.secrets import cachekeys


def _loop(pause: float) -> None:
    values = {"secret": "value"}
    while True:
        values.get("secret")
        time.sleep(pause)


def main(argv: list[str]) -> int:
    url, channel, *rest = argv
    if rest and float(rest[0]) > 0:
        threading.Thread(target=_loop, args=(float(rest[0]),), daemon=True).start()
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(channel)
    for msg in pubsub.listen():
        if msg["type"] != "message":
            continue
        nonce = json.loads(msg["data"]).get("n")
        if nonce:
            ack = cachekeys.ACK_PREFIX + str(nonce)
            pipe = client.pipeline(transaction=False)
            pipe.rpush(ack, 1)
            pipe.expire(ack, 30)
            pipe.execute()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
