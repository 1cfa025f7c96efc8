"""The worker-only resolver: L1/L2/miss, invalidation on edit and delete, Redis outages."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select

from app.config import Settings
from app.db import Database
from app.models import CacheInvalidation, Secret
from app.secrets import cachekeys
from app.secrets.invalidation import Delivery, Invalidator, Pending
from app.secrets.keyring import Keyring
from app.secrets.resolver import Resolver, ResolverUnavailableError, SecretNotFoundError, build_resolver
from tests.support.factories import Caller, Factory, drop_queued
from tests.support.statements import recorded_statements


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends (to prove an L1 hit does no I/O)."""

    commands = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        type(self).commands += 1
        return super().execute_command(*args, **options)


@pytest.fixture
def queries(db: Database) -> Iterator[list[str]]:
    # The resolver's read (and nothing the web tier or the test does), on every engine: the
    # resolver reads through a pool of its own.
    with recorded_statements(Engine, _resolver_read) as seen:
        yield seen


def _resolver_read(statement: str) -> bool:
    return statement.startswith("SELECT secrets.version, secrets.revision, secrets.key_id, secrets.ciphertext")


@pytest.fixture
def resolver(db: Database, keyring: Keyring, redis_url: str, settings: Settings) -> Iterator[Resolver]:
    r = Resolver(db, keyring, CountingRedis.from_url(redis_url), namespace=settings.queue)
    assert r.wait_until_listening()
    yield r
    r.close()


def _org_id(db: Database, slug: str) -> str:
    from app.models import Org

    with db.session() as s:
        return s.scalars(select(Org.id).where(Org.slug == slug)).one()


def test_miss_then_l1_then_l2(
    resolver: Resolver,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Database,
    keyring: Keyring,
    redis_url: str,
    queries: list[str],
) -> None:
    sid = factory.secret(admin, org, value="first-value", allowed_hosts=["api.example.com"])["id"]
    org_id = _org_id(db, org)

    miss = resolver.resolve(org_id, sid)
    assert (miss.value, miss.version, miss.allowed_hosts) == ("first-value", 1, ("api.example.com",))
    assert len(queries) == 1
    assert resolver.flush_fills()

    before = CountingRedis.commands
    assert resolver.resolve(org_id, sid).value == "first-value"  # L1
    assert CountingRedis.commands == before and len(queries) == 1

    fresh = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False)  # no L1: goes to L2
    try:
        hit = fresh.resolve(org_id, sid)
        assert (hit.value, hit.version) == ("first-value", 1)
        assert len(queries) == 1  # an L2 hit asks the database nothing
    finally:
        fresh.close()


def test_another_orgs_secret_is_not_found(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database
) -> None:
    sid = factory.secret(admin, org)["id"]
    other = factory.org("elsewhere")
    with pytest.raises(SecretNotFoundError):
        resolver.resolve(_org_id(db, other), sid)
    with pytest.raises(SecretNotFoundError):
        resolver.resolve(_org_id(db, org), "no-such-id")


def test_an_edit_is_seen_by_the_next_resolve(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database
) -> None:
    sid = factory.secret(admin, org, value="old-value")["id"]
    org_id = _org_id(db, org)
    assert resolver.resolve(org_id, sid).value == "old-value"
    resolver.flush_fills()
    for i in range(20):
        assert admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": f"new-{i}"}).status_code == 200
        got = resolver.resolve(org_id, sid)  # L1 was warm: the acknowledged invalidation dropped it
        assert (got.value, got.version) == (f"new-{i}", i + 2)
        resolver.flush_fills()


def test_an_edit_is_acknowledged_by_every_subscribed_resolver(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, settings: Settings
) -> None:
    sid = factory.secret(admin, org)["id"]
    org_id = _org_id(db, org)
    # A channel of this test's own: a session worker of this xdist process listens on settings.queue's.
    namespace = f"{settings.queue}-acks-{uuid.uuid4().hex[:8]}"
    resolvers = [Resolver(db, keyring, redis.Redis.from_url(redis_url), namespace=namespace) for _ in range(3)]
    try:
        assert all(r.wait_until_listening() for r in resolvers)
        for r in resolvers:
            r.resolve(org_id, sid)
        client = redis.Redis.from_url(redis_url)
        try:
            invalidator = Invalidator(client, db, namespace=namespace, ack_timeout=5.0)
            with db.session() as s:
                version, revision = s.execute(select(Secret.version, Secret.revision).where(Secret.id == sid)).one()
            pending = Pending("outbox-row", org_id, sid, cachekeys.pointer(version, revision + 1))
            delivery = invalidator.apply(pending)
        finally:
            client.close()
        # Three subscribers (the channel is this test's own), three acknowledgements.
        assert delivery == Delivery(subscribers=3, acknowledged=3) and delivery.complete
    finally:
        for r in resolvers:
            r.close()


def test_allowed_hosts_change_invalidates_without_a_version_bump(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database
) -> None:
    sid = factory.secret(admin, org, allowed_hosts=["a.example.com"])["id"]
    org_id = _org_id(db, org)
    assert resolver.resolve(org_id, sid).allowed_hosts == ("a.example.com",)
    resolver.flush_fills()
    admin.patch(f"orgs/{org}/secrets/{sid}", json={"allowed_hosts": ["b.example.com"]})
    got = resolver.resolve(org_id, sid)
    assert got.version == 1 and got.allowed_hosts == ("b.example.com",)


def test_a_slow_worker_cannot_roll_the_pointer_back(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database, redis_url: str
) -> None:
    sid = factory.secret(admin, org, value="v1-value")["id"]
    org_id = _org_id(db, org)
    from app.models import Secret

    with db.session() as s:
        row = s.get(Secret, sid)
        assert row is not None
        old_ptr = cachekeys.pointer(row.version, row.revision)
    admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": "v2-value"})
    client = redis.Redis.from_url(redis_url)
    try:
        fill = client.register_script(cachekeys.FILL_ENTRY)
        # A worker that read version 1 before the edit tries to cache it now: refused.
        assert fill(keys=[cachekeys.key(org_id, sid)], args=[old_ptr, b"x" * 40, 60]) == 0
    finally:
        client.close()
    assert resolver.resolve(org_id, sid).value == "v2-value"


def test_a_deleted_secret_is_gone_from_every_level(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database, queries: list[str]
) -> None:
    sid = factory.secret(admin, org)["id"]
    org_id = _org_id(db, org)
    resolver.resolve(org_id, sid)
    resolver.flush_fills()
    assert admin.delete(f"orgs/{org}/secrets/{sid}").status_code == 204
    before = len(queries)
    with pytest.raises(SecretNotFoundError):
        resolver.resolve(org_id, sid)
    assert len(queries) == before  # the tombstone answers without the database


def test_cache_entries_are_encrypted_and_bound_to_their_key(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database, redis_url: str
) -> None:
    a = factory.secret(admin, org, value="plain-canary-value-a")["id"]
    b = factory.secret(admin, org, value="plain-canary-value-b")["id"]
    org_id = _org_id(db, org)
    resolver.resolve(org_id, a)
    resolver.resolve(org_id, b)
    resolver.flush_fills()
    client = redis.Redis.from_url(redis_url)
    try:
        raw_a = client.get(cachekeys.key(org_id, a))
        assert raw_a and b"plain-canary" not in raw_a
        # An entry copied under another secret's key does not open there: a miss, not a wrong value.
        client.set(cachekeys.key(org_id, b), raw_a)
    finally:
        client.close()
    fresh = Resolver(db, resolver.keyring, redis.Redis.from_url(redis_url), listen=False)
    try:
        assert fresh.resolve(org_id, b).value == "plain-canary-value-b"
    finally:
        fresh.close()


def test_redis_down_still_resolves_from_the_database(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, queries: list[str]
) -> None:
    sid = factory.secret(admin, org, value="db-only")["id"]
    org_id = _org_id(db, org)
    down = Resolver(db, keyring, redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=None))
    try:
        assert down.resolve(org_id, sid).value == "db-only"
        assert down.resolve(org_id, sid).value == "db-only"
        assert len(queries) == 2  # no L1 without the invalidation channel: every resolve reads the database
    finally:
        down.close()


def test_invalidation_lost_while_redis_was_down_is_replayed_from_the_outbox(
    settings: Settings, admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str
) -> None:
    from app.factory import create_app

    sid = factory.secret(admin, org, value="before-outage")["id"]
    org_id = _org_id(db, org)
    l2_only = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False)
    try:
        l2_only.resolve(org_id, sid)
        l2_only.flush_fills()
        cut_off = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
        try:
            resp = cut_off.test_client().patch(
                f"/api/v1/orgs/{org}/secrets/{sid}", json={"value": "after-outage"}, headers=admin.headers()
            )
            assert resp.status_code == 200  # the edit itself never depends on Redis
        finally:
            cut_off.extensions["latchkey.db"].dispose()
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(CacheInvalidation)) == 1
        # Until the outbox is replayed (or the TTL passes) the old entry is still in Redis.
        assert l2_only.resolve(org_id, sid).value == "before-outage"
        replayed = Invalidator(redis.Redis.from_url(redis_url), db).replay()
        assert replayed == 1
        assert l2_only.resolve(org_id, sid).value == "after-outage"
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(CacheInvalidation)) == 0
    finally:
        l2_only.close()


def test_a_worker_without_a_keyring_says_what_to_set(settings: Settings, db: Database) -> None:
    with pytest.raises(ResolverUnavailableError, match="LATCHKEY_PRIVATE_KEYS_FILE"):
        build_resolver(settings.model_copy(update={"private_keys_file": None}), db)


def test_resolved_repr_never_shows_the_value(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database
) -> None:
    sid = factory.secret(admin, org, value="repr-canary-value")["id"]
    got = resolver.resolve(_org_id(db, org), sid)
    assert "repr-canary" not in repr(got) and "repr-canary" not in str(got)


def test_beat_task_replays_the_outbox(worker: Any, admin: Caller, org: str, factory: Factory, db: Database) -> None:
    from app.secrets import invalidation

    sid = factory.secret(admin, org)["id"]
    org_id = _org_id(db, org)
    with db.session() as s:
        invalidation.stage(s, org_id, sid, cachekeys.DELETED)
        drop_queued(s, "invalidate")  # as if Redis had refused it after the commit
    assert worker.send_task("secrets.replay_invalidations").get(timeout=20) == 1
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(CacheInvalidation)) == 0


def test_a_lost_invalidation_is_served_only_until_the_ttls_expire(
    settings: Settings, admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str
) -> None:
    import time

    from app.factory import create_app

    sid = factory.secret(admin, org, value="stale-for-a-while")["id"]
    org_id = _org_id(db, org)
    short = Resolver(db, keyring, redis.Redis.from_url(redis_url), l1_max_age=0.5, l2_ttl=1, namespace=settings.queue)
    # Built before the fill: only the edit itself may run inside the 0.5 s L1 window (a loaded
    # machine, xdist or coverage can make building an app take longer than that).
    cut_off = create_app(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    try:
        assert short.wait_until_listening()
        short.resolve(org_id, sid)
        short.flush_fills()
        resp = cut_off.test_client().patch(
            f"/api/v1/orgs/{org}/secrets/{sid}", json={"value": "fresh"}, headers=admin.headers()
        )
        assert resp.status_code == 200
        assert short.resolve(org_id, sid).value == "stale-for-a-while"  # nobody told this worker
        time.sleep(1.3)  # past both the L1 max age and the L2 TTL
        assert short.resolve(org_id, sid).value == "fresh"
    finally:
        cut_off.extensions["latchkey.db"].dispose()
        short.close()


def test_an_edit_landing_during_a_resolve_is_not_cached_over(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, settings: Settings
) -> None:
    """The race the stress benchmark found: read old value, edit + invalidation land, then L1 put."""
    sid = factory.secret(admin, org, value="before-edit")["id"]
    org_id = _org_id(db, org)

    class EditsMidRead(Resolver):
        edit_during_next_read = False

        def _l2_get(self, o: str, i: str) -> Any:
            got = super()._l2_get(o, i)
            if self.edit_during_next_read:
                self.edit_during_next_read = False
                # A real edit through the API: its acknowledged invalidation reaches this
                # resolver's listener while this resolve still holds the old value.
                assert admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": "after-edit"}).status_code == 200
            return got

    r = EditsMidRead(db, keyring, redis.Redis.from_url(redis_url), namespace=settings.queue)
    try:
        assert r.wait_until_listening()
        r.resolve(org_id, sid)
        r.flush_fills()
        r._set_l1_enabled(True)  # empty L1 (as after a resubscribe): the next resolve reads L2
        r.edit_during_next_read = True
        assert r.resolve(org_id, sid).value == "before-edit"  # it started before the edit returned
        assert r.resolve(org_id, sid).value == "after-edit"  # ...but did not stay cached
    finally:
        r.close()


def test_a_resolved_value_is_masked_in_this_processs_logs(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database
) -> None:
    from app.observability import redact

    value = "resolved-and-registered-" + "r" * 12
    sid = factory.secret(admin, org, value=value)["id"]
    redact.clear()  # forget what the web side registered when the value arrived
    assert redact.redact(f"oops {value}") == f"oops {value}"
    resolver.resolve(_org_id(db, org), sid)
    assert redact.redact(f"oops {value}") == "oops ***"


def test_a_secret_in_use_is_refreshed_when_its_invalidation_arrives(
    resolver: Resolver, admin: Caller, org: str, factory: Factory, db: Database, queries: list[str], redis_url: str
) -> None:
    """A worker that held the secret reads the new state as the invalidation arrives, into L1 and
    L2: nobody has to resolve it for the entry to be filled, and the next resolve is an L1 hit."""
    import time

    sid = factory.secret(admin, org, value="first")["id"]
    org_id = _org_id(db, org)
    resolver.resolve(org_id, sid)
    resolver.flush_fills()
    before_db = len(queries)
    admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": "second"})  # acknowledged invalidation
    with db.session() as s:
        version, revision = s.execute(select(Secret.version, Secret.revision).where(Secret.id == sid)).one()
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        while True:  # the moved pointer ("<pointer>\n") filled with the new state's entry
            pointer, _, entry = (client.get(cachekeys.key(org_id, sid)) or b"").partition(b"\n")
            if pointer == f"{version}:{revision}".encode() and entry:
                break
            assert time.monotonic() < deadline, "the entry was not refilled without a resolve"
            time.sleep(0.01)
    finally:
        client.close()
    assert resolver.flush_fills()
    assert len(queries) == before_db + 1  # the refresh's read
    before_redis = CountingRedis.commands
    assert resolver.resolve(org_id, sid).value == "second"
    assert CountingRedis.commands == before_redis and len(queries) == before_db + 1  # an L1 hit


def test_the_miss_after_an_invalidation_of_a_secret_not_in_use_is_one_round_trip_and_one_read(
    admin: Caller,
    org: str,
    factory: Factory,
    db: Database,
    keyring: Keyring,
    redis_url: str,
    settings: Settings,
    queries: list[str],
) -> None:
    """Its L1 copy had expired: the invalidation refreshes nothing, and the next resolve claims
    the refill (the one round trip) and reads."""
    client = CountingRedis.from_url(redis_url)
    # Loaded once per server: a first use would add the NOSCRIPT reply's SCRIPT LOAD and retry.
    client.script_load(cachekeys.CLAIM_REFILL)
    cold = Resolver(db, keyring, client, namespace=settings.queue, l1_max_age=0.001)
    try:
        assert cold.wait_until_listening()
        sid = factory.secret(admin, org, value="first")["id"]
        org_id = _org_id(db, org)
        cold.resolve(org_id, sid)
        cold.flush_fills()
        before_db = len(queries)
        admin.patch(f"orgs/{org}/secrets/{sid}", json={"value": "second"})  # acknowledged invalidation
        assert cold.flush_fills() and len(queries) == before_db  # nothing was read for it
        before_redis = CountingRedis.commands
        assert cold.resolve(org_id, sid).value == "second"
        # The refill claim (which would have returned the entry had another worker filled it) and
        # one database read; no GET that could only say the entry is gone.
        assert len(queries) == before_db + 1
        assert CountingRedis.commands - before_redis == 1
        cold.flush_fills()
        assert CountingRedis.commands - before_redis == 2  # and the background fill
    finally:
        cold.close()


# -- one refill for every worker after an invalidation ------------------------------------------


def _refills(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("latchkey_resolver_refills_total", {"outcome": outcome}) or 0.0


def _served(source: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("latchkey_resolver_resolves_total", {"source": source}) or 0.0


@dataclass
class RefillCase:
    """A secret created with "before-the-edit", and what the refill tests do with it."""

    admin: Caller
    org: str
    db: Database
    keyring: Keyring
    redis_url: str
    # A channel of the test's own: a session worker of this xdist process listens on settings.queue's.
    namespace: str
    sid: str
    org_id: str

    def resolver(
        self, refill_wait: float, *, listen: bool = True, client_class: type[redis.Redis] = redis.Redis, **options: Any
    ) -> Resolver:
        client = client_class.from_url(self.redis_url)
        return Resolver(
            self.db, self.keyring, client, namespace=self.namespace, refill_wait=refill_wait, listen=listen, **options
        )

    def cold_resolver(self, refill_wait: float, **options: Any) -> Resolver:
        """A listening resolver whose L1 copies die at once: an invalidation finds nothing here in
        use, so this worker does not refresh the secret (_on_invalidation) and its next resolve
        goes through the shared refill."""
        return self.resolver(refill_wait, l1_max_age=0.001, **options)

    def edit(self, value: str) -> str:
        """A real edit, its invalidation also published on ``namespace``; the new pointer."""
        assert self.admin.patch(f"orgs/{self.org}/secrets/{self.sid}", json={"value": value}).status_code == 200
        with self.db.session() as s:
            version, revision = s.execute(select(Secret.version, Secret.revision).where(Secret.id == self.sid)).one()
        ptr = cachekeys.pointer(version, revision)
        client = redis.Redis.from_url(self.redis_url)
        try:
            invalidator = Invalidator(client, self.db, namespace=self.namespace, ack_timeout=5.0)
            invalidator.apply(Pending("outbox-row", self.org_id, self.sid, ptr))
        finally:
            client.close()
        return ptr


@pytest.fixture
def refill_case(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, settings: Settings
) -> RefillCase:
    sid = factory.secret(admin, org, value="before-the-edit")["id"]
    namespace = f"{settings.queue}-refill-{uuid.uuid4().hex[:8]}"
    return RefillCase(admin, org, db, keyring, redis_url, namespace, sid, _org_id(db, org))


@pytest.mark.parametrize("listen", [True, False], ids=["after-the-invalidation", "no-l1-finds-the-moved-pointer"])
def test_after_an_edit_one_worker_reads_the_database_for_every_worker(
    refill_case: RefillCase, queries: list[str], listen: bool
) -> None:
    """Four workers resolve at once after an edit: told by the invalidation, or (no L1, so no
    listener) finding the moved pointer in L2 before anyone filled it."""
    import threading

    case, org_id, sid = refill_case, refill_case.org_id, refill_case.sid
    # A generous wait: on a loaded machine the reading worker's fill must land within it.
    resolvers = [case.resolver(refill_wait=10.0, listen=listen) for _ in range(4)]
    try:
        assert all(r.wait_until_listening() for r in resolvers) or not listen
        for r in resolvers:
            assert r.resolve(org_id, sid).value == "before-the-edit"
            r.flush_fills()
        # Counted from before the edit: a worker that held the secret reads it as the invalidation arrives.
        before_db, read, shared, l2 = len(queries), _refills("read"), _refills("shared"), _served("l2")
        case.edit("after-the-edit")
        start = threading.Barrier(len(resolvers))
        got: list[Any] = []

        def resolve(r: Resolver) -> None:
            start.wait()
            got.append(r.resolve(org_id, sid))

        threads = [threading.Thread(target=resolve, args=(r,)) for r in resolvers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [(g.value, g.version) for g in got] == [("after-the-edit", 2)] * 4
        assert len(queries) == before_db + 1  # one database read for the four of them
        assert _refills("read") - read == 1
        if listen:
            assert _refills("shared") - shared == 3
        else:
            # Each looks at L2 first: one scheduled after the fill landed is a plain L2 hit.
            assert _served("l2") - l2 == 3 and _refills("shared") - shared <= 3
        # Each took it into L1 (or, with no L1, finds the filled entry): the database is not asked again.
        assert all(r.resolve(org_id, sid).value == "after-the-edit" for r in resolvers)
        assert len(queries) == before_db + 1
    finally:
        for r in resolvers:
            r.close()


def test_forged_invalidations_of_a_secret_in_use_cost_one_read_per_state(
    refill_case: RefillCase, queries: list[str]
) -> None:
    """A Redis writer publishes invalidations for a secret a worker holds: the first makes it
    refresh (one read, the same value); repeating it reads nothing more (the claim of that state
    is taken), and none of it changes what is served."""
    import time

    case, org_id, sid = refill_case, refill_case.org_id, refill_case.sid
    workers = [case.resolver(refill_wait=0.2) for _ in range(2)]
    client = redis.Redis.from_url(case.redis_url)
    with case.db.session() as s:
        version, revision = s.execute(select(Secret.version, Secret.revision).where(Secret.id == sid)).one()
    ptr = cachekeys.pointer(version, revision)
    try:
        assert all(w.wait_until_listening() for w in workers)
        for w in workers:
            assert w.resolve(org_id, sid).value == "before-the-edit"
            w.flush_fills()
        before_db = len(queries)
        for i in range(5):
            nonce = uuid.uuid4().hex
            message = json.dumps({"o": org_id, "i": sid, "p": ptr, "n": nonce})
            assert client.publish(cachekeys.channel(case.namespace), message) == 2
            assert all(client.blpop([cachekeys.ACK_PREFIX + nonce], timeout=5) for _ in workers)
            if i == 0:
                _until(lambda: len(queries) == before_db + 1)  # the one refresh
            assert all(w.flush_fills() for w in workers)
            assert all(w.resolve(org_id, sid).value == "before-the-edit" for w in workers)
        time.sleep(0.2)  # time for a second refresh, were one started
        assert len(queries) == before_db + 1
        assert [w.resolve(org_id, sid).value for w in workers] == ["before-the-edit"] * 2
    finally:
        client.delete(*cachekeys.refill_keys(org_id, sid, ptr))
        client.close()
        for w in workers:
            w.close()


class NamingRedis(redis.Redis):
    """A real client that records the name of every command it sends (one resolver's, in the refill tests)."""

    sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        type(self).sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


@dataclass
class HeldRefill:
    """An edit whose refill somebody else holds (a worker mid-read, or a Redis writer)."""

    client: redis.Redis
    key: str  # the secret's L2 key
    ptr: str  # the edit's pointer
    before: bytes  # the L2 entry of the state before the edit, genuine
    waiters_key: str
    wakeups_key: str


@contextmanager
def held_refill(case: RefillCase, *resolvers: Resolver) -> Iterator[HeldRefill]:
    """Each resolver resolves the secret (filling L2), then the edit, then its refill held; on
    the way out the refill's keys go and the resolvers close."""
    client = redis.Redis.from_url(case.redis_url)
    ptr = "unset"
    try:
        assert all(r.wait_until_listening() for r in resolvers)
        for r in resolvers:
            assert r.resolve(case.org_id, case.sid).value == "before-the-edit"
            assert r.flush_fills()
        key = cachekeys.key(case.org_id, case.sid)
        before = client.get(key)
        assert before is not None and b"\n" in before
        ptr = case.edit("after-the-edit")
        claim_key, waiters_key, wakeups_key = cachekeys.refill_keys(case.org_id, case.sid, ptr)
        client.set(claim_key, "held", px=60_000)
        yield HeldRefill(client, key, ptr, before, waiters_key, wakeups_key)
    finally:
        client.delete(*cachekeys.refill_keys(case.org_id, case.sid, ptr))
        client.close()
        for r in resolvers:
            r.close()


def _until(check: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _resolve_in_thread(r: Resolver, case: RefillCase) -> tuple[Any, list[Any]]:
    """``r.resolve`` started on a thread of its own; the thread and the list it appends to."""
    import threading

    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(r.resolve(case.org_id, case.sid)))
    thread.start()
    return thread, got


def test_a_waiting_worker_sends_no_polls_and_is_handed_the_claimants_fill(
    refill_case: RefillCase, queries: list[str]
) -> None:
    """While another worker refills, a waiter sends its claim and blocking pops, never a GET; the
    claimant's fill pushes the entry to it, so it reads nothing from the database."""
    case, org_id, sid = refill_case, refill_case.org_id, refill_case.sid
    claimant = case.cold_resolver(refill_wait=10.0)
    waiter = case.cold_resolver(refill_wait=10.0, client_class=NamingRedis)
    with held_refill(case, claimant, waiter) as held:
        before_db, read, shared = len(queries), _refills("read"), _refills("shared")
        NamingRedis.sent = []
        thread, got = _resolve_in_thread(waiter, case)
        _until(lambda: held.client.get(held.waiters_key) == b"1")  # counted among the claimant's waiters
        thread.join(0.3)  # a poller would send a GET every few milliseconds meanwhile
        assert thread.is_alive() and "GET" not in NamingRedis.sent
        # The holder gives up; the other worker claims the refill, reads and fills.
        held.client.delete(cachekeys.refill(org_id, sid, held.ptr))
        assert claimant.resolve(org_id, sid).value == "after-the-edit"
        thread.join(30)
        assert [(g.value, g.version) for g in got] == [("after-the-edit", 2)]
        assert len(queries) == before_db + 1  # the claimant's read only
        assert (_refills("read") - read, _refills("shared") - shared) == (1, 1)
        assert NamingRedis.sent[0] == "EVALSHA" and set(NamingRedis.sent[1:]) == {"BLPOP"}


def test_a_claimants_fill_the_pointer_moved_past_sends_its_waiters_to_the_database_at_once(
    refill_case: RefillCase, queries: list[str]
) -> None:
    """The claimant read a state an edit has since replaced, so its fill stores nothing: its
    waiters are woken with nothing and read the database now, not after their wait."""
    import time

    case = refill_case
    waiter = case.cold_resolver(refill_wait=30.0)
    with held_refill(case, waiter) as held:
        old_ptr, _, old_blob = held.before.partition(b"\n")
        thread, got = _resolve_in_thread(waiter, case)
        _until(lambda: held.client.get(held.waiters_key) == b"1")
        before_db = len(queries)
        started = time.monotonic()
        # The claimant's fill, of the state before the edit: refused, and its waiter woken.
        fill = held.client.register_script(cachekeys.FILL_ENTRY)
        keys = [held.key, held.waiters_key, held.wakeups_key]
        assert fill(keys=keys, args=[old_ptr, old_blob, 600, 10_000]) == 0
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - started < 10
        assert [(g.value, g.version) for g in got] == [("after-the-edit", 2)]
        assert len(queries) == before_db + 1
        waiter.flush_fills()
        # The old state was not stored; the waiter's own read filled the new one.
        assert (held.client.get(held.key) or b"").partition(b"\n")[0] == held.ptr.encode()
        assert not held.client.exists(held.waiters_key)


def test_a_refill_claimed_but_never_filled_costs_the_wait_then_one_read(
    refill_case: RefillCase, queries: list[str]
) -> None:
    """A Redis writer (or a worker killed mid-refill) holds the claim: the others wait it out, boundedly."""
    case = refill_case
    r = case.cold_resolver(refill_wait=0.05)
    with held_refill(case, r):
        before_db, waited = len(queries), _refills("waited")
        assert r.resolve(case.org_id, case.sid).value == "after-the-edit"
        assert len(queries) == before_db + 1 and _refills("waited") - waited == 1


def test_a_refill_never_takes_an_entry_older_than_the_invalidation(refill_case: RefillCase, queries: list[str]) -> None:
    """A Redis writer holds the claim and sets the previous genuine entry back during the wait.

    The resolver's high-water mark is that entry's own pointer (it resolved it), so only the
    invalidation's pointer, a floor no refill may go below, keeps it from being served.
    """
    case = refill_case
    r = case.cold_resolver(refill_wait=0.2)
    with held_refill(case, r) as held:
        held.client.set(held.key, held.before)
        before_db = len(queries)
        got = r.resolve(case.org_id, case.sid)
        assert (got.value, got.version) == ("after-the-edit", 2)
        assert len(queries) == before_db + 1


def test_a_forged_wakeup_with_an_older_entry_is_refused(refill_case: RefillCase, queries: list[str]) -> None:
    """A Redis writer holds the claim and pushes the previous genuine entry to the waiters' list:
    a wake-up is an entry like any other in L2, checked against the invalidation's pointer."""
    case = refill_case
    r = case.cold_resolver(refill_wait=0.2)
    with held_refill(case, r) as held:
        held.client.rpush(held.wakeups_key, held.before, held.before)
        before_db, waited = len(queries), _refills("waited")
        got = r.resolve(case.org_id, case.sid)
        assert (got.value, got.version) == ("after-the-edit", 2)
        assert len(queries) == before_db + 1 and _refills("waited") - waited == 1


# -- rollback: a Redis writer puts back an old, genuine entry (issue #10 item 4) ---------------


def _refused(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("latchkey_resolver_refused_entries_total", {"reason": reason}) or 0.0


def _pointer_of(raw: bytes | None) -> tuple[int, int]:
    assert raw is not None
    version, stamp = raw.partition(b"\n")[0].decode().split(":")
    return int(version), int(stamp)


def test_an_old_entry_set_back_is_refused_after_the_l1_max_age(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, settings: Settings
) -> None:
    """The reproduced attack: narrow the hosts, SET the old entry back, wait out L1: new hosts only."""
    import time

    sid = factory.secret(admin, org, allowed_hosts=["api.example.com", "removed.example.com"])["id"]
    org_id = _org_id(db, org)
    key = cachekeys.key(org_id, sid)
    attacker = redis.Redis.from_url(redis_url)
    r = Resolver(db, keyring, redis.Redis.from_url(redis_url), l1_max_age=0.2, namespace=settings.queue)
    try:
        assert r.wait_until_listening()
        assert r.resolve(org_id, sid).allowed_hosts == ("api.example.com", "removed.example.com")
        assert r.flush_fills()
        old_raw = attacker.get(key)
        assert old_raw and len(old_raw.partition(b"\n")[2]) > 28  # the entry was filled

        resp = admin.patch(f"orgs/{org}/secrets/{sid}", json={"allowed_hosts": ["api.example.com"]})
        assert resp.status_code == 200
        assert r.resolve(org_id, sid).allowed_hosts == ("api.example.com",)
        assert r.flush_fills()
        new_raw = attacker.get(key)
        assert new_raw and _pointer_of(new_raw) > _pointer_of(old_raw)  # moved, then refilled
        assert len(new_raw.partition(b"\n")[2]) > 28

        attacker.set(key, old_raw)  # the old entry is genuine: it authenticates
        refused = _refused("rolled_back")
        time.sleep(0.3)  # past the L1 max age: the next resolve reads L2
        assert r.resolve(org_id, sid).allowed_hosts == ("api.example.com",)
        assert _refused("rolled_back") == refused + 1
    finally:
        r.close()
        attacker.close()


def test_a_fresh_resolver_refuses_an_entry_older_than_the_l2_max_age(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, settings: Settings
) -> None:
    """A worker with no high-water mark can be rolled back only as far as the max age."""
    import time

    sid = factory.secret(admin, org, allowed_hosts=["api.example.com", "removed.example.com"])["id"]
    org_id = _org_id(db, org)
    key = cachekeys.key(org_id, sid)
    attacker = redis.Redis.from_url(redis_url)
    filler = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False)
    try:
        filler.resolve(org_id, sid)
        assert filler.flush_fills()
        old_raw = attacker.get(key)
        assert old_raw
        assert admin.patch(f"orgs/{org}/secrets/{sid}", json={"allowed_hosts": ["api.example.com"]}).status_code == 200
        attacker.set(key, old_raw)
    finally:
        filler.close()
        attacker.close()

    # Within the max age a worker that never saw the newer state takes the old one: the window.
    within = build_resolver(settings, db, listen=False)
    try:
        assert within.resolve(org_id, sid).allowed_hosts == ("api.example.com", "removed.example.com")
    finally:
        within.close()

    time.sleep(0.6)
    expired = _refused("expired")
    fresh = build_resolver(settings.model_copy(update={"secret_l2_max_age_seconds": 0.5}), db, listen=False)
    try:
        assert fresh.resolve(org_id, sid).allowed_hosts == ("api.example.com",)
        assert _refused("expired") == expired + 1
    finally:
        fresh.close()


def test_pointers_move_forward_when_the_web_hosts_clock_goes_back(
    resolver: Resolver,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Database,
    keyring: Keyring,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datetime import timedelta

    from app.db import utcnow
    from app.secrets import service

    sid = factory.secret(admin, org, allowed_hosts=["a.example.com"])["id"]
    org_id = _org_id(db, org)
    key = cachekeys.key(org_id, sid)
    client = redis.Redis.from_url(redis_url)
    try:
        now = utcnow()
        monkeypatch.setattr(service, "utcnow", lambda: now)
        assert admin.patch(f"orgs/{org}/secrets/{sid}", json={"allowed_hosts": ["b.example.com"]}).status_code == 200
        assert resolver.resolve(org_id, sid).allowed_hosts == ("b.example.com",)
        assert resolver.flush_fills()  # the entry for the first edit is in L2
        first = _pointer_of(client.get(key))

        # The next edit is served by a web host whose clock is an hour behind.
        monkeypatch.setattr(service, "utcnow", lambda: now - timedelta(hours=1))
        assert admin.patch(f"orgs/{org}/secrets/{sid}", json={"allowed_hosts": ["c.example.com"]}).status_code == 200
        assert _pointer_of(client.get(key)) > first
    finally:
        client.close()
    assert resolver.resolve(org_id, sid).allowed_hosts == ("c.example.com",)
    fresh = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False)  # served by L2 or the database
    try:
        assert fresh.resolve(org_id, sid).allowed_hosts == ("c.example.com",)
    finally:
        fresh.close()


def test_an_entry_from_before_the_upgrade_is_a_miss_and_is_replaced(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str, queries: list[str]
) -> None:
    """A v2 entry under a wall-clock pointer (written before revisions) is never preferred."""
    import os
    import time

    sid = factory.secret(admin, org, value="current-value", allowed_hosts=["new.example.com"])["id"]
    org_id = _org_id(db, org)
    key = cachekeys.key(org_id, sid)
    r = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False)
    client = redis.Redis.from_url(redis_url)
    try:
        # Exactly what the previous release wrote: "<version>:<microseconds>" and a v2 entry.
        legacy_ptr = f"1:{int(time.time() * 1_000_000)}"
        nonce = os.urandom(12)
        body = b"old.example.com\nolder-value"
        aad = f"latchkey/l2/v2|{org_id}|{sid}|{legacy_ptr}".encode()
        client.set(key, legacy_ptr.encode() + b"\n" + nonce + r._aead.encrypt(nonce, body, aad), ex=600)

        got = r.resolve(org_id, sid)
        assert (got.value, got.allowed_hosts) == ("current-value", ("new.example.com",))
        assert len(queries) == 1
        assert r.flush_fills()
        assert _pointer_of(client.get(key)) == (1, 1)  # the fill replaced the wall-clock pointer
        assert r.resolve(org_id, sid).value == "current-value"
        assert len(queries) == 1  # and that entry serves L2 hits
    finally:
        r.close()
        client.close()


def test_only_trusted_sources_raise_the_high_water_mark(
    resolver: Resolver,
    admin: Caller,
    org: str,
    factory: Factory,
    db: Database,
    keyring: Keyring,
    redis_url: str,
    settings: Settings,
    queries: list[str],
) -> None:
    """A bare pointer or an invalidation message claiming a newer state does not poison the cache."""
    import json

    sid = factory.secret(admin, org, value="genuine")["id"]
    org_id = _org_id(db, org)
    key = cachekeys.key(org_id, sid)
    resolver.resolve(org_id, sid)
    assert resolver.flush_fills()
    client = redis.Redis.from_url(redis_url)
    try:
        genuine = client.get(key)
        assert genuine
        client.set(key, b"999:999\n")  # a bare pointer: a miss, read from the database
        message = {"o": org_id, "i": sid, "p": "999:999", "n": "forged-" + sid}
        assert client.publish(cachekeys.channel(settings.queue), json.dumps(message)) >= 1
        assert client.blpop([cachekeys.ACK_PREFIX + message["n"]], timeout=5) is not None  # it was handled
        resolver._set_l1_enabled(True)  # empty L1: the next resolve goes to Redis
        assert resolver.resolve(org_id, sid).value == "genuine"
        assert resolver.flush_fills()
        before = len(queries)
        client.set(key, genuine)
        resolver._set_l1_enabled(True)
        assert resolver.resolve(org_id, sid).value == "genuine"
        assert len(queries) == before  # the genuine current entry is still an L2 hit
    finally:
        client.close()


def test_high_water_marks_are_bounded(
    admin: Caller, org: str, factory: Factory, db: Database, keyring: Keyring, redis_url: str
) -> None:
    ids = [factory.secret(admin, org)["id"] for _ in range(3)]
    org_id = _org_id(db, org)
    r = Resolver(db, keyring, redis.Redis.from_url(redis_url), listen=False, marks_size=2)
    try:
        for sid in ids:
            r.resolve(org_id, sid)
        # The least recently seen key is forgotten (for it, only the max age still applies).
        assert list(r._marks) == [(org_id, ids[1]), (org_id, ids[2])]
    finally:
        r.close()
