"""Canary scanning: look for a secret value, in any common encoding, in everything we store or print."""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable
from typing import Any

import redis
import sqlalchemy as sa

from app.config import Settings
from tests.support.processes import queued_messages


def leak_forms(canary: str) -> set[str]:
    """The canary as it could appear: plain, URL-encoded, hex, and base64 at every alignment."""
    raw = canary.encode()
    forms = {canary, urllib.parse.quote(canary, safe=""), urllib.parse.quote_plus(canary), raw.hex()}
    for pad in (b"", b"\x00", b"\x00\x00"):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = enc(pad + raw).decode().rstrip("=")
            # Drop the characters that depend on the bytes around the canary.
            skip = {0: 0, 1: 2, 2: 3}[len(pad)]
            core = encoded[skip:-2] if len(encoded) > skip + 6 else encoded
            forms.add(core)
    return {f for f in forms if len(f) >= 8}


def find_leaks(haystacks: Iterable[tuple[str, str]], canaries: Iterable[str]) -> list[str]:
    """``[(where, text)]`` x canaries -> human-readable findings (empty when clean)."""
    forms = {c: leak_forms(c) for c in canaries}
    found = []
    for where, text in haystacks:
        for canary, variants in forms.items():
            for v in variants:
                if v in text:
                    found.append(f"{canary[:6]}... found in {where} as {v[:12]}...")
    return found


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        return b.decode("latin-1") + " " + b.hex() + " " + base64.b64encode(b).decode()
    return str(value)


def dump_database(engine: sa.Engine) -> list[tuple[str, str]]:
    """Every row of every table (reflected, so nothing is missed), as text."""
    out: list[tuple[str, str]] = []
    meta = sa.MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            rows = conn.execute(table.select()).all()
            out.append((f"table {table.name}", "\n".join(" | ".join(_text(v) for v in row) for row in rows)))
    if engine.dialect.name == "postgresql" and shutil.which("pg_dump"):
        url = engine.url
        dump = subprocess.run(
            [
                "pg_dump",
                "-h",
                url.host or "127.0.0.1",
                "-p",
                str(url.port or 5432),
                "-U",
                url.username or "postgres",
                "--data-only",
                url.database or "",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        out.append(("pg_dump", dump.stdout))
    return out


def dump_broker_queue(settings: Settings, queue: str) -> list[tuple[str, str]]:
    """Every message waiting in ``queue``, as the broker (Redis or RabbitMQ) holds it: body, headers, properties."""
    return [
        (f"broker {queue}", _text(m.body) + " " + repr(m.headers) + " " + repr(m.properties))
        for m in queued_messages(settings, queue)
    ]


def dump_redis(url: str) -> list[tuple[str, str]]:
    """Every key and value in the Redis database, whatever its type."""
    r = redis.Redis.from_url(url)
    out: list[tuple[str, str]] = []
    try:
        for key in r.scan_iter(count=500):
            kind = r.type(key).decode()
            if kind == "string":
                value: Any = r.get(key)
            elif kind == "hash":
                value = r.hgetall(key)
            elif kind == "list":
                value = r.lrange(key, 0, -1)
            elif kind == "set":
                value = r.smembers(key)
            elif kind == "zset":
                value = r.zrange(key, 0, -1)
            else:
                value = kind
            out.append((f"redis {key!r}", _text(key) + " " + _text(repr(value))))
    finally:
        r.close()
    return out
