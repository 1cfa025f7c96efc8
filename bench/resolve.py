"""``python -m bench.resolve``: the secret resolver's L1 hit, L2 hit and miss against their floors.

One run on PostgreSQL and Redis (issue 3): a throwaway database ``latchkey_bench_resolve_<pid>``
(migrated, dropped at the end) and Redis database 13, where only the keys this run created are
deleted (``lk:s:<bench org id>:*`` and ``lkbench:<pid>:*``; nothing is flushed).

Timed paths (``time.perf_counter_ns`` around one ``resolve()`` call, N iterations after a warm-up):

* **L1 hit**: a resolver with its invalidation listener (L1 on), resolving one cached secret.
* **L2 hit**: a resolver with ``listen=False`` (L1 stays off), so every resolve is one Redis GET.
* **miss**: the same, with the L2 key deleted before each resolve and the background fill
  flushed after it, both outside the timed region.
* **floors**, timed in the same loop as the path they bound (alternating which runs first):
  one bare GET of a same-size value with the same client settings; and one PostgreSQL point
  lookup done exactly like the miss path does it (the same Core select built per call,
  ``engine.connect()``, ``execute().first()``, ``rollback()``, on the same engine) plus one HPKE open.

Then a counting pass per path (DB statements and round trips, Redis commands) and, with
``--stress-edits``, the stale-read stress run over HTTP. ``--strict`` exits 1 on a failed goal.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import http.client
import io
import json
import logging
import os
import pstats
import sys
import threading
import time
from array import array
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from prometheus_client import REGISTRY
from sqlalchemy import Engine, event, select
from werkzeug.serving import make_server

from app.access import OrgAccess
from app.db import Database
from app.factory import create_app
from app.models import Org, Secret
from app.secrets import cachekeys
from app.secrets import service as secrets_service
from app.secrets.invalidation import Invalidator, Pending
from app.secrets.keyring import Keyring
from app.secrets.resolver import LATENCY, RESOLVES, Resolver, SecretReader
from app.secrets.schemas import SecretCreate
from app.secrets.sealing import open_sealed, secret_context
from bench.common import (
    CTX,
    REDIS_URL,
    Goal,
    Keys,
    Report,
    delete_matching,
    machine_info,
    make_settings,
    make_user,
    new_keys,
    print_goals,
    print_table,
    resolver_redis,
    summarize,
    throwaway_database,
    write_json,
)
from tests.support.stale_reads import find_stale

GOAL_L1_US = 5.0
GOAL_L2_RATIO = 1.2
GOAL_MISS_RATIO = 1.2
VALUE = "sk-bench-" + "k" * 48  # an API-key-sized value
HOSTS = ["api.example.com"]

pc = time.perf_counter_ns


# -- instrumentation ------------------------------------------------------------------------


class CountingRedis(redis.Redis):
    """A real client counting the commands it sends: on the resolving thread vs. background threads.

    Pipelines and pub/sub connections are separate objects and are not counted (the paths
    measured here use neither).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.foreground_ident = threading.get_ident()
        self.foreground = 0
        self.background = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if threading.get_ident() == self.foreground_ident:
            self.foreground += 1
        else:
            self.background += 1
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def zero(self) -> None:
        self.foreground = self.background = 0


class DbCounter:
    """DB statements (``before_cursor_execute``) and round trips (+ pool pre-pings, BEGIN, ROLLBACK, COMMIT)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements = 0
        self.secret_selects = 0
        self.pings = 0
        self.begins = 0
        self.ends = 0

    def __enter__(self) -> DbCounter:
        event.listen(Engine, "before_cursor_execute", self._statement)
        event.listen(Engine, "begin", self._begin)
        event.listen(Engine, "rollback", self._end)
        event.listen(Engine, "commit", self._end)
        dialect: Any = self.engine.dialect
        original = type(dialect).do_ping

        def counting_ping(dbapi_connection: Any) -> bool:
            self.pings += 1
            return bool(original(dialect, dbapi_connection))

        dialect.do_ping = counting_ping  # instance attribute shadows the method for the pool's pre-ping
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(Engine, "before_cursor_execute", self._statement)
        event.remove(Engine, "begin", self._begin)
        event.remove(Engine, "rollback", self._end)
        event.remove(Engine, "commit", self._end)
        del self.engine.dialect.do_ping

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements += 1
        if "FROM secrets" in statement:
            self.secret_selects += 1

    def _begin(self, conn: Any) -> None:
        self.begins += 1

    def _end(self, conn: Any) -> None:
        self.ends += 1

    @property
    def round_trips(self) -> int:
        # psycopg 3 sends BEGIN as its own command before the first statement, and ROLLBACK
        # as its own command; the pool's pre-ping is one more statement.
        return self.pings + self.begins + self.statements + self.ends


def served() -> dict[str, float]:
    """How many resolves each level answered so far (the resolver's own Prometheus counter)."""
    out = {}
    for source in ("l1", "l2", "db", "tombstone", "not_found"):
        out[source] = REGISTRY.get_sample_value("latchkey_resolver_resolves_total", {"source": source}) or 0.0
    return out


def served_delta(before: dict[str, float]) -> dict[str, int]:
    now = served()
    return {k: int(now[k] - before[k]) for k in now if now[k] - before[k]}


# -- the pieces the floors and the miss are made of -----------------------------------------


def secret_select(org_id: str, secret_id: str) -> Any:
    """The resolver's miss query, built the same way (per call)."""
    return select(Secret.version, Secret.revision, Secret.key_id, Secret.ciphertext, Secret.allowed_hosts).where(
        Secret.org_id == org_id, Secret.id == secret_id, Secret.ciphertext.is_not(None)
    )


def db_floor(reader: SecretReader, keyring: Keyring, org_id: str, secret_id: str) -> bytes:
    """One PG point lookup (through the resolver's own reader, exactly as a miss does it) + one HPKE open."""
    row = reader.read(org_id, secret_id)
    assert row is not None
    return open_sealed(keyring, row.ciphertext, secret_context(org_id, secret_id, row.version), row.key_id)


class RawPointLookup:
    """One round trip: an autocommit psycopg connection, a prepared SELECT (informational floor)."""

    SQL = (
        "SELECT version, revision, key_id, ciphertext, allowed_hosts FROM secrets "
        "WHERE org_id = %s AND id = %s AND ciphertext IS NOT NULL"
    )

    def __init__(self, database_url: str) -> None:
        dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
        self.conn = psycopg.connect(dsn, autocommit=True, prepare_threshold=0)

    def __call__(self, keyring: Keyring, org_id: str, secret_id: str) -> bytes:
        row = self.conn.execute(self.SQL, (org_id, secret_id)).fetchone()
        assert row is not None
        return open_sealed(keyring, row[3], secret_context(org_id, secret_id, row[0]), row[2])

    def close(self) -> None:
        self.conn.close()


# -- timed loops ----------------------------------------------------------------------------


def timer_overhead(n: int) -> dict[str, float]:
    samples = [0] * n
    for i in range(n):
        t0 = pc()
        samples[i] = pc() - t0
    return summarize(samples)


def time_alone(fn: Callable[[], Any], n: int, warmup: int) -> list[int]:
    for _ in range(warmup):
        fn()
    gc.collect()
    samples = [0] * n
    for i in range(n):
        t0 = pc()
        fn()
        samples[i] = pc() - t0
    return samples


def time_pair(
    path: Callable[[], Any],
    floor: Callable[[], Any],
    n: int,
    warmup: int,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Time ``path`` and ``floor`` in one loop, alternating which goes first (untimed before/after)."""
    for _ in range(warmup):
        if before:
            before()
        path()
        if after:
            after()
        floor()
    gc.collect()
    a, b = [0] * n, [0] * n
    for i in range(n):
        if i % 2:
            t0 = pc()
            floor()
            b[i] = pc() - t0
        if before:
            before()
        t0 = pc()
        path()
        a[i] = pc() - t0
        if after:
            after()
        if not i % 2:
            t0 = pc()
            floor()
            b[i] = pc() - t0
    return a, b


def profile(fn: Callable[[], Any], n: int, before: Callable[[], Any] | None = None, top: int = 25) -> str:
    prof = cProfile.Profile()
    for _ in range(n):
        if before:
            before()
        prof.enable()
        fn()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _race(resolver: Resolver, org: str, sid: str, start: threading.Barrier, took: list[int], i: int) -> None:
    """One racer of ``Bench.refill_race``: resolve once the others are ready; ns into ``took[i]``."""
    start.wait()
    t0 = pc()
    resolver.resolve(org, sid)
    took[i] = pc() - t0


# -- the benchmark --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, database_url: str, keys: Keys) -> None:
        self.args = args
        self.database_url = database_url
        self.keys = keys
        self.keyring = keys.keyring
        self.settings = make_settings(database_url, REDIS_URL, keys, queue=f"latchkey-bench-{os.getpid()}")
        self.db = Database()
        self.db.configure(database_url)
        assert self.db.engine is not None
        self.engine: Engine = self.db.engine
        # The floor reads the way a miss reads: through the resolver's own reader.
        self.reader = SecretReader(database_url)
        self.admin = make_user(self.db, org_slug=f"bench-{os.getpid()}", role="admin")
        assert self.admin.org_id is not None
        self.org_id: str = self.admin.org_id
        self.redis = redis.Redis.from_url(REDIS_URL)  # housekeeping only (DEL, SET), never timed
        self.floor_key = f"lkbench:{os.getpid()}:floor"
        self.resolvers: list[Resolver] = []
        self.report = Report("resolve")

    # helpers

    def bump_revision(self, conn: psycopg.Connection[Any], sid: str) -> str:
        """An edit's state change, made in the database as every committed change makes it; the new pointer."""
        row = conn.execute(
            "UPDATE secrets SET revision = revision + 1 WHERE id = %s RETURNING version, revision", (sid,)
        ).fetchone()
        assert row is not None
        return cachekeys.pointer(row[0], row[1])

    def new_secret(self, name: str, value: str = VALUE) -> str:
        with self.db.session() as s:
            org = s.get(Org, self.org_id)
            assert org is not None
            data = SecretCreate(name=name, value=value, allowed_hosts=HOSTS)
            secret = secrets_service.create_secret(s, CTX, OrgAccess.system(org), self.keyring.public_set(), data)
            return secret.id

    def resolver(self, *, listen: bool, client: redis.Redis | None = None, **options: Any) -> Resolver:
        r = Resolver(
            self.db,
            self.keyring,
            client or resolver_redis(REDIS_URL),
            listen=listen,
            namespace=self.settings.queue,
            **options,
        )
        self.resolvers.append(r)
        if listen:
            assert r.wait_until_listening(), "the resolver's invalidation listener did not subscribe"
        return r

    def close_resolvers(self) -> None:
        for r in self.resolvers:
            r.close()
        self.resolvers.clear()

    def close(self) -> None:
        self.close_resolvers()
        delete_matching(
            self.redis,
            f"{cachekeys.KEY_PREFIX}{self.org_id}:*",
            f"{cachekeys.REFILL_PREFIX}{self.org_id}:*",
            f"lkbench:{os.getpid()}:*",
        )
        self.redis.close()
        self.db.dispose()

    # the paths

    def run(self) -> None:
        n, warmup = self.args.n, self.args.warmup
        sid = self.new_secret("BENCH_SECRET")
        org = self.org_id
        key = cachekeys.key(org, sid)
        results = self.report.results
        results["timer_overhead_us"] = timer_overhead(n)

        # L1 -------------------------------------------------------------------------------
        l1 = self.resolver(listen=True)
        first = l1.resolve(org, sid)
        assert first.value == VALUE
        assert l1.flush_fills()
        before = served()
        l1_samples = time_alone(lambda: l1.resolve(org, sid), n, warmup)
        results["l1_hit"] = {"us": summarize(l1_samples), "served": served_delta(before)}

        # L2 vs a bare GET -------------------------------------------------------------------
        raw = self.redis.get(key)
        assert raw and b"\n" in raw and len(raw) > 40, "the L2 entry was not filled"
        self.redis.set(self.floor_key, os.urandom(len(raw)))
        l2 = self.resolver(listen=False)
        floor_client = resolver_redis(REDIS_URL)
        before = served()
        l2_samples, get_samples = time_pair(
            lambda: l2.resolve(org, sid), lambda: floor_client.get(self.floor_key), n, warmup
        )
        results["l2_hit"] = {"us": summarize(l2_samples), "served": served_delta(before), "entry_bytes": len(raw)}
        results["floor_redis_get"] = {"us": summarize(get_samples), "value_bytes": len(raw)}

        # miss vs PG point lookup + HPKE open ---------------------------------------------------
        miss = self.resolver(listen=False)

        def drop_l2() -> None:
            self.redis.delete(key)

        def settle() -> None:
            assert miss.flush_fills()

        def vs_floor(
            resolver: Resolver, before: Callable[[], Any], after: Callable[[], Any]
        ) -> tuple[list[int], list[int]]:
            """``resolver.resolve`` timed against the floor (a PG lookup + HPKE open), in one loop."""
            return time_pair(
                lambda: resolver.resolve(org, sid),
                lambda: db_floor(self.reader, self.keyring, org, sid),
                n,
                warmup,
                before=before,
                after=after,
            )

        before = served()
        miss_samples, floor_samples = vs_floor(miss, drop_l2, settle)
        results["miss"] = {"us": summarize(miss_samples), "served": served_delta(before)}
        results["floor_pg_lookup_hpke_open"] = {"us": summarize(floor_samples)}

        # the steady-state miss: the first resolve after an edit's invalidation -----------------
        # (each iteration is an edit's state change: the revision bumped in the database, the
        # pointer moved as the web tier moves it, and the listener's drop with that pointer; the
        # miss is then the claim of the shared refill, one round trip, and the database read)
        warm = self.resolver(listen=True)
        bump = psycopg.connect(self.database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        move = self.redis.register_script(cachekeys.MOVE_POINTER)

        def invalidate() -> None:
            ptr = self.bump_revision(bump, sid)
            move(keys=[key], args=[ptr, 600])
            warm.drop_local(org, sid, ptr)  # what the listener does on the invalidation message

        def settle_warm() -> None:
            assert warm.flush_fills()

        before = served()
        inv_samples, inv_floor = vs_floor(warm, invalidate, settle_warm)
        results["miss_after_invalidation"] = {"us": summarize(inv_samples), "served": served_delta(before)}
        results["floor_pg_lookup_hpke_open_2"] = {"us": summarize(inv_floor)}

        # the same edit of a secret in use: a real invalidation, published and acknowledged, so the
        # listener bids for the refill and refreshes the secret before the timed resolve asks ----
        # (the only listener holding it: the row above's resolver would bid too)
        warm.close()
        self.resolvers.remove(warm)
        in_use = self.resolver(listen=True)
        in_use.resolve(org, sid)
        invalidator = Invalidator(self.redis, self.db, namespace=self.settings.queue, ack_timeout=5.0)

        def edit_in_use() -> None:
            delivery = invalidator.apply(Pending("bench", org, sid, self.bump_revision(bump, sid)))
            assert delivery.complete, "the invalidation was not acknowledged"

        def settle_in_use() -> None:
            assert in_use.flush_fills()

        before = served()
        use_samples, use_floor = vs_floor(in_use, edit_in_use, settle_in_use)
        bump.close()
        results["first_resolve_after_an_edit_in_use"] = {"us": summarize(use_samples), "served": served_delta(before)}
        results["floor_pg_lookup_hpke_open_3"] = {"us": summarize(use_floor)}

        # informational floors: one round trip; the parts of a miss ------------------------------
        raw_lookup = RawPointLookup(self.database_url)
        try:
            rt = time_alone(lambda: raw_lookup(self.keyring, org, sid), n, warmup)
        finally:
            raw_lookup.close()
        results["floor_one_round_trip_lookup_hpke_open"] = {"us": summarize(rt)}
        results["miss_parts"] = self.miss_parts(l2, org, sid, max(n // 2, 500))

        # counting passes -----------------------------------------------------------------------
        results["counts_per_resolve"] = self.counts(org, sid, key, min(n, 1000))
        results["refill_race"] = self.refill_race(max(50, min(n // 10, 300)))

        if self.args.profile:
            self.profiles(org, sid, key)
        self.close_resolvers()  # the stress counts the channel's subscribers: only its own

        # goals ---------------------------------------------------------------------------------
        counts = results["counts_per_resolve"]
        l1_med = results["l1_hit"]["us"]["median"]
        miss_med, pg_med = results["miss"]["us"]["median"], results["floor_pg_lookup_hpke_open"]["us"]["median"]
        l2_ratio = results["l2_hit"]["us"]["median"] / results["floor_redis_get"]["us"]["median"]
        miss_ratio = miss_med / pg_med
        inv_med = results["miss_after_invalidation"]["us"]["median"]
        inv_floor_med = results["floor_pg_lookup_hpke_open_2"]["us"]["median"]
        inv_ratio = inv_med / inv_floor_med
        self.report.goals += [
            Goal("L1 hit median", f"< {GOAL_L1_US:.0f} us", f"{l1_med:.2f} us", l1_med < GOAL_L1_US),
            Goal(
                "L2 hit vs bare GET (median)",
                f"<= {GOAL_L2_RATIO}x",
                f"{results['l2_hit']['us']['median']:.1f} / {results['floor_redis_get']['us']['median']:.1f} us",
                l2_ratio <= GOAL_L2_RATIO,
                l2_ratio,
            ),
            Goal(
                "cold miss (L2 looked up first) vs PG lookup + HPKE open (median)",
                f"<= {GOAL_MISS_RATIO}x",
                f"{miss_med:.1f} / {pg_med:.1f} us",
                miss_ratio <= GOAL_MISS_RATIO,
                miss_ratio,
            ),
            Goal(
                "miss after an invalidation vs PG lookup + HPKE open (median)",
                f"<= {GOAL_MISS_RATIO}x",
                f"{inv_med:.1f} / {inv_floor_med:.1f} us",
                inv_ratio <= GOAL_MISS_RATIO,
                inv_ratio,
            ),
            Goal(
                "DB queries on hits",
                "0",
                f"L1 {counts['l1_hit']['db_statements']:g}, L2 {counts['l2_hit']['db_statements']:g}",
                counts["l1_hit"]["db_statements"] == 0 and counts["l2_hit"]["db_statements"] == 0,
            ),
        ]

    def refill_race(self, trials: int, k: int = 4) -> dict[str, Any]:
        """After each of ``trials`` invalidations, ``k`` listening resolvers (threads of this process)
        resolve at once: the first to finish is the one that read the database, the others took its
        refill (``_shared_refill``). Their latencies in ms, and what served them."""
        sid = self.new_secret("REFILL_RACE")
        org = self.org_id
        key = cachekeys.key(org, sid)
        racers = [self.resolver(listen=True) for _ in range(k)]
        bump = psycopg.connect(self.database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        move = self.redis.register_script(cachekeys.MOVE_POINTER)
        first: list[int] = []
        others: list[int] = []
        before = served()
        try:
            for r in racers:
                r.resolve(org, sid)
            for _ in range(trials):
                ptr = self.bump_revision(bump, sid)
                move(keys=[key], args=[ptr, 600])
                for r in racers:
                    r.drop_local(org, sid, ptr)  # each listener's drop on the invalidation message
                start = threading.Barrier(k)
                took = [0] * k
                threads = [threading.Thread(target=_race, args=(racers[i], org, sid, start, took, i)) for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                took.sort()
                first.append(took[0])
                others.extend(took[1:])
                for r in racers:
                    assert r.flush_fills()
        finally:
            bump.close()
        return {
            "trials": trials,
            "resolvers": k,
            "first_ms": summarize(first, scale=1e6),
            "others_ms": summarize(others, scale=1e6),
            "served": served_delta(before),
        }

    def miss_parts(self, resolver: Resolver, org: str, sid: str, n: int) -> dict[str, Any]:
        """Manual timing of each step of a miss, in the order the resolver does them."""
        parts: dict[str, list[int]] = {
            k: []
            for k in (
                "l2_get_nil",
                "reader_read",
                "hpke_open",
                "seal_l2_entry",
                "metrics_and_fill_enqueue",
            )
        }
        client = resolver.redis
        assert client is not None
        nil_key = f"lkbench:{os.getpid()}:absent"
        resolved = resolver.resolve(org, sid)
        ptr = "1:0"
        for i in range(n + 50):
            marks = [pc()]
            client.get(nil_key)
            marks.append(pc())
            row = self.reader.read(org, sid)
            marks.append(pc())
            assert row is not None
            open_sealed(self.keyring, row.ciphertext, secret_context(org, sid, row.version), row.key_id)
            marks.append(pc())
            resolver._seal_entry(org, sid, ptr, resolved, time.time())
            marks.append(pc())
            RESOLVES.labels("db").inc()
            LATENCY.labels("db").observe(0.0)
            marks.append(pc())
            if i >= 50:
                for name, a, b in zip(parts, marks, marks[1:], strict=False):
                    parts[name].append(b - a)
        out = {name: summarize(v)["median"] for name, v in parts.items()}
        out["sum_of_medians"] = sum(out.values())
        return out

    def counts(self, org: str, sid: str, key: str, m: int) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def count(name: str, r: Resolver, client: CountingRedis, before: Callable[[], Any] | None = None) -> None:
            r.resolve(org, sid)  # reach the state being counted
            assert r.flush_fills()
            client.zero()
            with DbCounter(self.engine) as dbc:
                for _ in range(m):
                    if before:
                        before()
                    r.resolve(org, sid)
                    assert r.flush_fills()
            out[name] = {
                "db_statements": dbc.statements / m,
                "db_round_trips": dbc.round_trips / m,
                "db_pool_pre_pings": dbc.pings / m,
                "redis_commands_resolving_thread": client.foreground / m,
                "redis_commands_background": client.background / m,
                "iterations": m,
            }

        c1 = resolver_redis(REDIS_URL, CountingRedis)
        assert isinstance(c1, CountingRedis)
        count("l1_hit", self.resolver(listen=True, client=c1), c1)
        c2 = resolver_redis(REDIS_URL, CountingRedis)
        assert isinstance(c2, CountingRedis)
        count("l2_hit", self.resolver(listen=False, client=c2), c2)
        c3 = resolver_redis(REDIS_URL, CountingRedis)
        assert isinstance(c3, CountingRedis)
        count("miss", self.resolver(listen=False, client=c3), c3, before=lambda: self.redis.delete(key))
        # The floors, counted the same way.
        with DbCounter(self.engine) as dbc:
            for _ in range(m):
                db_floor(self.reader, self.keyring, org, sid)
        out["floor_pg_lookup_hpke_open"] = {
            "db_statements": dbc.statements / m,
            "db_round_trips": dbc.round_trips / m,
            "db_pool_pre_pings": dbc.pings / m,
        }
        return out

    def profiles(self, org: str, sid: str, key: str) -> None:
        m = min(self.args.n, 2000)
        l1 = self.resolver(listen=True)
        l1.resolve(org, sid)
        l1.flush_fills()
        l2 = self.resolver(listen=False)
        miss = self.resolver(listen=False)
        floor_client = resolver_redis(REDIS_URL)
        texts = {
            "l1_hit": profile(lambda: l1.resolve(org, sid), m),
            "l2_hit": profile(lambda: l2.resolve(org, sid), m),
            "floor_redis_get": profile(lambda: floor_client.get(self.floor_key), m),
            "miss": profile(
                lambda: miss.resolve(org, sid), m // 4, before=lambda: (miss.flush_fills(), self.redis.delete(key))
            ),
            "floor_pg_lookup_hpke_open": profile(lambda: db_floor(self.reader, self.keyring, org, sid), m // 4),
        }
        self.report.results["profiles"] = texts
        for name, text in texts.items():
            print(f"\n=== cProfile: {name} (sorted by tottime) ===")
            print(text)

    # -- stale-read stress ----------------------------------------------------------------------

    def stress(self, edits: int, k: int, l1_max_age: float | None = None) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = create_app(self.settings)
        invalidator = app.extensions["latchkey.invalidator"]
        apply_ns: list[int] = []
        original_apply = invalidator.apply

        def timed_apply(item: Any) -> Any:
            t0 = pc()
            try:
                return original_apply(item)
            finally:
                apply_ns.append(pc() - t0)

        invalidator.apply = timed_apply  # time the pointer move + publish + ack wait of each edit

        ack_warnings: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.WARNING:
                    ack_warnings.append(record.getMessage())

        inv_log = logging.getLogger("latchkey.invalidation")
        handler = Collect()
        inv_log.addHandler(handler)

        server = make_server("127.0.0.1", 0, app, threaded=True)
        server_thread = threading.Thread(target=server.serve_forever, name="bench-http", daemon=True)
        server_thread.start()
        port = server.server_port

        sid = self.new_secret("STRESS_SECRET", value="stress-value-0")  # version 1
        foreign = int(self.redis.pubsub_numsub(cachekeys.channel(self.settings.queue))[0][1])
        options: dict[str, Any] = {"l1_max_age": l1_max_age} if l1_max_age is not None else {}
        resolvers = [self.resolver(listen=True, **options) for _ in range(k)]
        running = [True]
        starts = [array("q") for _ in range(k)]
        versions = [array("q") for _ in range(k)]
        mismatched = [0] * k
        errors: list[str] = []
        ready = threading.Barrier(k + 1)
        org = self.org_id

        def resolve_loop(i: int) -> None:
            r, ts, vs = resolvers[i], starts[i], versions[i]
            ready.wait()
            try:
                while running[0]:
                    t = pc()
                    got = r.resolve(org, sid)
                    ts.append(t)
                    vs.append(got.version)
                    if got.value != f"stress-value-{got.version - 1}":
                        mismatched[i] += 1
            except Exception as exc:  # a benchmark reports; it does not crash the other threads
                errors.append(f"resolver {i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=resolve_loop, args=(i,), name=f"bench-resolve-{i}") for i in range(k)]
        for t in threads:
            t.start()
        served_before = served()
        ready.wait()

        edit_version = array("q")
        edit_returned = array("q")
        edit_latency: list[int] = []
        headers = {"Authorization": f"Bearer {self.admin.token}", "Content-Type": "application/json"}
        path = f"/api/v1/orgs/{self.admin.org_slug}/secrets/{sid}"
        t_begin = pc()
        try:
            for i in range(edits):
                body = json.dumps({"value": f"stress-value-{i + 1}"})
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                t0 = pc()
                conn.request("PATCH", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                t1 = pc()
                conn.close()
                if resp.status != 200:
                    raise RuntimeError(f"edit {i}: HTTP {resp.status} {data[:200]!r}")
                edit_version.append(json.loads(data)["version"])
                edit_returned.append(t1)
                edit_latency.append(t1 - t0)
        finally:
            t_end = pc()
            time.sleep(0.05)  # let the resolvers read after the last edit too
            running[0] = False
            for t in threads:
                t.join(timeout=30)
            served_after = served_delta(served_before)
            server.shutdown()
            server_thread.join(timeout=5)
            inv_log.removeHandler(handler)
            app.extensions["latchkey.db"].dispose()
            app.extensions["latchkey.redis"].close()

        max_age = l1_max_age if l1_max_age is not None else resolvers[0].l1_max_age if resolvers else 0.0
        found = find_stale(starts, versions, edit_returned, edit_version)
        stale = found.stale
        total = sum(len(s) for s in starts)
        elapsed = (t_end - t_begin) / 1e9
        lat = summarize(edit_latency, scale=1e6)
        inv = summarize(apply_ns, scale=1e6)
        self.report.results["stress"] = {
            "edits": len(edit_version),
            "resolver_threads": k,
            "l1_max_age_s": max_age,
            "foreign_subscribers_on_channel": foreign,
            "resolves": total,
            "resolves_per_thread": [len(s) for s in starts],
            "served": served_after,
            "edits_per_s": len(edit_version) / elapsed if elapsed else 0.0,
            "edit_api_latency_ms": lat,
            "invalidation_apply_ms": inv,
            "ack_timeouts": len(ack_warnings),
            "ack_timeout_examples": ack_warnings[:5],
            "stale_reads": stale,
            "edits_read_stale": found.edits_read_stale,
            "stale_examples": found.examples,
            "stale_max_lag_ms": found.max_lag_ms,
            "value_version_mismatches": sum(mismatched),
            "errors": errors,
            "final_version": edit_version[-1] if edit_version else None,
        }
        self.report.goals.append(
            Goal(
                f"stale reads ({len(edit_version)} edits, {k} resolvers, L1 max age {max_age:g} s)",
                "0",
                f"{stale} of {total:,} resolves",
                stale == 0 and not errors and not sum(mismatched) and len(edit_version) == edits,
                notes="" if not foreign else f"{foreign} subscriber(s) of another process were on the channel",
            )
        )


# -- output ----------------------------------------------------------------------------------


def print_report(report: Report) -> None:
    r = report.results
    print(f"\nresolve benchmark: N={report.config['n']} (warm-up {report.config['warmup']}), times in us")
    print(
        f"machine: {report.machine.get('cpus')} CPUs, load {report.machine.get('loadavg_at_start')}, "
        f"PostgreSQL {report.machine.get('postgresql')}, Redis {report.machine.get('redis')}\n"
    )
    rows = []
    for name, label in (
        ("l1_hit", "L1 hit"),
        ("l2_hit", "L2 hit"),
        ("floor_redis_get", "floor: bare Redis GET"),
        ("miss", "miss"),
        ("floor_pg_lookup_hpke_open", "floor: PG lookup + HPKE open"),
        ("miss_after_invalidation", "miss after an invalidation (not in use)"),
        ("first_resolve_after_an_edit_in_use", "(info) first resolve after an edit, in use"),
        ("floor_one_round_trip_lookup_hpke_open", "(info) 1-round-trip lookup + open"),
        ("timer_overhead_us", "(info) timer overhead"),
    ):
        if name not in r:
            continue
        us = r[name]["us"] if "us" in r[name] else r[name]
        rows.append([label, us["median"], us["p90"], us["p99"]])
    if rows:
        print_table(["path", "median", "p90", "p99"], rows)

    counts = r.get("counts_per_resolve", {})
    if counts:
        print("\nper resolve (counting pass):")
        print_table(
            ["path", "DB statements", "DB round trips", "pre-pings", "Redis cmds (caller)", "Redis cmds (background)"],
            [
                [
                    name,
                    c["db_statements"],
                    c["db_round_trips"],
                    c["db_pool_pre_pings"],
                    c.get("redis_commands_resolving_thread", ""),
                    c.get("redis_commands_background", ""),
                ]
                for name, c in counts.items()
            ],
        )
    if "refill_race" in r:
        race = r["refill_race"]
        print(
            f"\nrefill race: after each of {race['trials']} invalidations {race['resolvers']} resolvers resolve at once"
            f" (ms): the first p50 {race['first_ms']['median']:.2f} p90 {race['first_ms']['p90']:.2f};"
            f" the others p50 {race['others_ms']['median']:.2f} p90 {race['others_ms']['p90']:.2f}"
            f" p99 {race['others_ms']['p99']:.2f}; served {race['served']}"
        )
    if "miss_parts" in r:
        print("\nmiss, step by step (medians, us):")
        print_table(["step", "median"], [[k, v] for k, v in r["miss_parts"].items()])
    for name in ("l1_hit", "l2_hit", "miss"):
        if name in r:
            print(f"served from ({name}): {r[name]['served']}")
    if "stress" in r:
        s = r["stress"]
        lat, inv = s["edit_api_latency_ms"], s["invalidation_apply_ms"]
        print(
            f"\nstress: {s['edits']} edits over HTTP, {s['resolver_threads']} resolver threads (L1 on, max age "
            f"{s['l1_max_age_s']} s; switch interval {report.config['stress_switch_interval_s']} s), "
            f"{s['resolves']:,} resolves {s['served']}\n"
            f"  edits/s {s['edits_per_s']:.1f}; edit API latency p50 {lat['median']:.2f} ms, "
            f"p99 {lat['p99']:.2f} ms (of which pointer move + publish + acks p50 {inv['median']:.2f} ms, "
            f"p99 {inv['p99']:.2f} ms); ack timeouts {s['ack_timeouts']}\n"
            f"  stale reads {s['stale_reads']} after {s['edits_read_stale']} of the edits "
            f"(max {s['stale_max_lag_ms']:.2f} ms after the edit returned), "
            f"value/version mismatches {s['value_version_mismatches']}, errors {len(s['errors'])}, "
            f"subscribers of other processes on the channel {s['foreign_subscribers_on_channel']}"
        )
        for ex in s["stale_examples"]:
            print(f"  stale: {ex}")
        for err in s["errors"][:5]:
            print(f"  error: {err}")
    print()
    print_goals(report.goals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resolve", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="timed iterations per path (default 5000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed iterations first (default 500)")
    parser.add_argument("--stress-edits", type=int, default=0, help="run the stale-read stress with this many edits")
    parser.add_argument("--stress-resolvers", type=int, default=4, help="resolver threads in the stress (default 4)")
    parser.add_argument(
        "--stress-switch-interval",
        type=float,
        default=0.0001,
        help="sys.setswitchinterval() during the stress (default 0.0001 s; Python's own is 0.005 s): "
        "the resolver threads spin on L1 hits in the server's process and would otherwise hold the GIL "
        "for 5 ms at every hand-over",
    )
    parser.add_argument(
        "--stress-l1-max-age",
        type=float,
        default=None,
        help="the stress resolvers' L1 max age in seconds (default: the resolver's own, 30 s)",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the timed paths (stress only)")
    parser.add_argument("--profile", action="store_true", help="print cProfile of each path")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    args = parser.parse_args(argv)

    keys = new_keys()
    try:
        with throwaway_database("resolve") as url:
            bench = Bench(args, url, keys)
            bench.report.machine = machine_info(bench.redis, url)
            bench.report.config = {
                "n": args.n,
                "warmup": args.warmup,
                "stress_edits": args.stress_edits,
                "stress_resolvers": args.stress_resolvers,
                "stress_switch_interval_s": args.stress_switch_interval or sys.getswitchinterval(),
                "database": "PostgreSQL (throwaway database)",
                "redis": REDIS_URL,
            }
            try:
                if not args.no_timing:
                    bench.run()
                if args.stress_edits:
                    previous = sys.getswitchinterval()
                    if args.stress_switch_interval:
                        sys.setswitchinterval(args.stress_switch_interval)
                    try:
                        bench.stress(args.stress_edits, args.stress_resolvers, args.stress_l1_max_age)
                    finally:
                        sys.setswitchinterval(previous)
            finally:
                bench.close()
    finally:
        keys.close()
    print_report(bench.report)
    write_json(args.json, bench.report)
    return 1 if args.strict and not bench.report.all_passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
