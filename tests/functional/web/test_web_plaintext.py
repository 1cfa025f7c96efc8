"""The web tier keeps no plaintext: after a create and an edit, no value is reachable from module state."""

from __future__ import annotations

import contextlib
import gc
import secrets
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from app.config import Settings
from app.db import Database
from app.factory import create_app
from tests.support.factories import Factory

# Bounds of the walk: deep enough for module -> registry -> dict -> key, small enough to finish.
MAX_DEPTH = 14
MAX_OBJECTS = 3_000_000


@pytest.fixture
def web_only(settings: Settings) -> Iterator[Flask]:
    """A web app with the public key set only: no private keyring, as in production."""
    app = create_app(settings.model_copy(update={"private_keys_file": None}))
    yield app
    app.extensions["latchkey.db"].dispose()


def _holds(obj: Any, needles: tuple[str, ...]) -> bool:
    if isinstance(obj, str):
        return any(n in obj for n in needles)
    if isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        return any(n.encode() in data for n in needles)
    return False


def _children(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            yield key
            yield value
    elif isinstance(obj, list | tuple | set | frozenset | deque):
        yield from list(obj)
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:
        attrs = None
    if isinstance(attrs, dict):
        yield attrs
    for cls in type(obj).__mro__:
        for name in cls.__dict__.get("__slots__", ()):
            if isinstance(name, str) and name not in ("__dict__", "__weakref__"):
                with contextlib.suppress(Exception):
                    yield object.__getattribute__(obj, name)


def reachable_from_modules(needles: tuple[str, ...]) -> list[str]:
    """Paths (module.global...) from module globals to a string or bytes containing a needle."""
    found: list[str] = []
    seen: set[int] = set()
    queue: deque[tuple[Any, str, int]] = deque(
        (vars(mod), name, 0) for name, mod in list(sys.modules.items()) if mod is not None
    )
    visited = 0
    while queue and visited < MAX_OBJECTS:
        obj, path, depth = queue.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        visited += 1
        if _holds(obj, needles):
            found.append(path)
            continue
        if depth >= MAX_DEPTH or isinstance(obj, str | bytes | bytearray | int | float | type(None)):
            continue
        for i, child in enumerate(_children(obj)):
            queue.append((child, f"{path}/{type(obj).__name__}[{i}]", depth + 1))
    assert visited < MAX_OBJECTS, "the walk hit its bound before covering everything reachable"
    return found


def held_by_live_containers(needles: tuple[str, ...]) -> list[str]:
    """Every live container the garbage collector knows of that holds such a string."""
    hits: list[str] = []
    for obj in gc.get_objects():
        containers = dict | list | tuple | set | frozenset | deque
        if isinstance(obj, containers) and any(_holds(child, needles) for child in _children(obj)):
            hits.append(type(obj).__name__)
    return hits


def test_a_web_process_retains_no_value_after_create_and_edit(web_only: Flask) -> None:
    assert web_only.extensions["latchkey.public_keys"] is not None
    assert web_only.config["LATCHKEY_SETTINGS"].private_keys_file is None
    db: Database = web_only.extensions["latchkey.db"]
    factory = Factory(db, web_only.test_client())
    org = factory.org()
    admin = factory.user(org, "admin")
    # Made at run time, so no code object or constant table holds them.
    first = "web-first-" + secrets.token_hex(16)
    second = "web-second-" + secrets.token_hex(16)

    resp = admin.post(f"orgs/{org}/secrets", json={"name": "WEB_ONLY", "value": first})
    assert resp.status_code == 201, resp.get_json()
    secret_id = resp.get_json()["id"]
    resp = admin.patch(f"orgs/{org}/secrets/{secret_id}", json={"value": second})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["version"] == 2
    del resp
    gc.collect()

    needles = (first, second)
    assert reachable_from_modules(needles) == []
    assert held_by_live_containers(needles) == []
