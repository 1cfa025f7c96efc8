"""What both benchmarks share: a throwaway database, Redis clients, settings, statistics, output."""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import migrate
from app.access import OrgAccess, OrgRole
from app.config import Settings, load_settings
from app.context import Actor, RequestContext
from app.db import Database
from app.identity import service as identity
from app.identity.schemas import OrgCreate, TokenCreate, UserCreate
from app.secrets.keyring import Keyring

PG_ADMIN_URL = os.environ.get("LATCHKEY_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# Redis database 13 is the benchmarks' own; only keys the benchmark created are deleted from it.
REDIS_URL = os.environ.get("LATCHKEY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
CTX = RequestContext(Actor("system"), request_id="bench")
_seq = itertools.count(1)


# -- backends ------------------------------------------------------------------------------


@contextmanager
def throwaway_database(kind: str, revision: str = "head") -> Iterator[str]:
    """Create ``latchkey_bench_<kind>_<pid>``, migrate it to ``revision``, yield its URL, drop it."""
    name = f"latchkey_bench_{kind}_{os.getpid()}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        migrate.upgrade(url, revision)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def resolver_redis(url: str, cls: type[redis.Redis] = redis.Redis) -> redis.Redis:
    """A client with exactly the settings ``app.secrets.resolver.build_resolver`` uses."""
    return cls.from_url(
        url,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )


def delete_matching(client: redis.Redis, *patterns: str) -> int:
    """Delete the keys matching ``patterns`` (SCAN, never KEYS or FLUSHDB)."""
    gone = 0
    for pattern in patterns:
        batch = list(client.scan_iter(match=pattern, count=1000))
        if batch:
            gone += int(client.delete(*batch))
    return gone


@dataclass
class Keys:
    keyring: Keyring
    path: Path
    tmp: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        self.tmp.cleanup()


def new_keys() -> Keys:
    tmp = tempfile.TemporaryDirectory(prefix="latchkey-bench-")
    path = Path(tmp.name) / "keyring.json"
    ring = Keyring.generate()
    ring.write(path)
    return Keys(ring, path, tmp)


def make_settings(database_url: str, redis_url: str, keys: Keys, queue: str) -> Settings:
    return load_settings(
        {},
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        secret_key="bench-secret-key-" + "x" * 32,
        public_keys=keys.keyring.public_set().dumps(),
        private_keys_file=keys.path,
        log_level="WARNING",
        queue=queue,
    )


@dataclass
class Principal:
    user_id: str
    token: str
    org_id: str | None = None
    org_slug: str | None = None


def make_user(
    db: Database, *, org_slug: str | None = None, role: OrgRole = "admin", operator: bool = False
) -> Principal:
    """An org (when ``org_slug``), a user in it and an API token, through the real services."""
    with db.session() as s:
        org = identity.create_org(s, CTX, OrgCreate(slug=org_slug, name=org_slug.title())) if org_slug else None
        user = identity.create_user(
            s, CTX, UserCreate(email=f"bench-{os.getpid()}-{next(_seq)}@example.test", operator=operator)
        )
        if org is not None:
            identity.add_member(s, CTX, OrgAccess.system(org), user, role)
        _tok, raw = identity.create_token(s, CTX, user, TokenCreate(name="bench"))
        return Principal(user.id, raw, org.id if org else None, org_slug)


# -- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return float(sorted_values[int(rank) - 1])


def summarize(samples_ns: Sequence[int], scale: float = 1e3) -> dict[str, float]:
    """median / p90 / p99 / min / mean / max of nanosecond samples, in µs (scale=1e3) or ms (1e6)."""
    values = sorted(s / scale for s in samples_ns)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": values[0],
        "mean": statistics.fmean(values),
        "max": values[-1],
    }


# -- goals and output ----------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    passed: bool
    ratio: float | None = None
    notes: str = ""


@dataclass
class Report:
    benchmark: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return all(g.passed for g in self.goals)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["all_passed"] = self.all_passed
        return out


def machine_info(redis_client: redis.Redis | None = None, database_url: str | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
    }
    if redis_client is not None:
        info["redis"] = redis_client.info("server").get("redis_version")
    if database_url is not None:
        engine = sa.create_engine(database_url)
        try:
            with engine.connect() as conn:
                info["postgresql"] = conn.execute(sa.text("SHOW server_version")).scalar()
        finally:
            engine.dispose()
    return info


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _kind(pid: int, comm: bytes, cmdline: bytes) -> str:
    if pid == os.getpid():
        return "bench"
    if (b"celery" in cmdline and b" worker" in cmdline) or b"bench.acknowledger" in cmdline:
        return "worker"  # bench.acknowledger: the floor's stand-in for one (bench.many_workers)
    if b"gunicorn" in cmdline:
        return "web"
    if comm.startswith(b"postgres") or cmdline.startswith(b"postgres"):
        return "postgres"
    if comm.startswith(b"redis-server"):
        return "redis"
    return "other"


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU time (user + system, seconds) every process on the machine has used, summed by kind.

    Kinds: ``worker`` (``celery ... worker``), ``web`` (gunicorn), ``postgres``, ``redis``,
    ``bench`` (this process, its client threads included) and ``other``. Read from ``/proc``
    (Linux); take two readings around a round and subtract (``cpu_delta``). Ended processes
    are not counted: take the readings while the processes being compared run.
    """
    out = dict.fromkeys(("worker", "web", "postgres", "redis", "bench", "other"), 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except OSError:  # ended meanwhile
            continue
        comm, fields = stat[stat.index(b"(") + 1 : stat.rindex(b")")], stat[stat.rindex(b")") + 2 :].split()
        out[_kind(int(entry.name), comm, cmdline)] += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return out


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, after[k] - before.get(k, 0.0)) for k in after}


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)))


def print_goals(goals: Sequence[Goal]) -> None:
    print_table(
        ["goal", "target", "measured", "ratio", "result"],
        [
            [g.name, g.target, g.measured, "" if g.ratio is None else f"{g.ratio:.2f}x", "PASS" if g.passed else "FAIL"]
            for g in goals
        ],
    )
    for g in goals:
        if g.notes:
            print(f"  note ({g.name}): {g.notes}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).replace("x", "").lstrip("-").isdigit()


def write_json(path: str | None, report: Report) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    print(f"results written to {target}")
