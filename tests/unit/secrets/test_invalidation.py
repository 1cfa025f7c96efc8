"""The web tier's wait for acknowledgements: counted once each, taken together, counted when late to look."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from app.secrets import cachekeys
from app.secrets.invalidation import await_acks


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.commands: list[str] = []

    def execute_command(self, *args: object, **options: object) -> object:
        self.commands.append(str(args[0]))
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


@pytest.fixture
def client(redis_url: str) -> Iterator[CountingRedis]:
    c = CountingRedis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def ack_key(client: CountingRedis) -> Iterator[str]:
    key = cachekeys.ACK_PREFIX + uuid.uuid4().hex
    yield key
    client.delete(key)


def test_acknowledgements_already_there_are_taken_in_two_commands_whatever_their_number(
    client: CountingRedis, ack_key: str
) -> None:
    client.rpush(ack_key, *[1] * 8)
    client.commands.clear()
    assert await_acks(client, ack_key, 8, time.monotonic() + 5) == 8
    assert client.commands == ["BLPOP", "LPOP"]  # not one BLPOP per worker
    assert client.llen(ack_key) == 0


def test_acknowledgements_that_arrived_in_time_count_when_the_web_process_looks_late(
    client: CountingRedis, ack_key: str
) -> None:
    client.rpush(ack_key, 1, 1, 1)
    # The deadline passed before this process looked (it was not scheduled): what is there counts.
    assert await_acks(client, ack_key, 4, time.monotonic() - 1) == 3


def test_a_missing_acknowledgement_is_not_counted(client: CountingRedis, ack_key: str) -> None:
    client.rpush(ack_key, 1)
    assert await_acks(client, ack_key, 2, time.monotonic() + 0.05) == 1


def test_no_subscriber_means_no_wait(client: CountingRedis, ack_key: str) -> None:
    client.commands.clear()
    assert await_acks(client, ack_key, 0, time.monotonic() + 5) == 0
    assert client.commands == []
