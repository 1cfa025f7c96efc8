"""The internal secret API (worker only): ``resolve(org_id, secret_id) -> Resolved``.

Three levels, measured so that round trips, not crypto, are the cost:

* **L1**: in-process LRU keyed by (org, id). A hit costs no I/O. Entries are dropped by an
  invalidation message (Redis pub/sub, acknowledged so the editing request only returns once
  every subscribed worker has dropped its copy), by a short max age, and all at once whenever
  the subscription is down (L1 is then bypassed until it is back).
* **L2**: Redis, one GET of ``lk:s:{org}:{id}`` holding the pointer and the AES-GCM entry
  (see ``cachekeys``); a hit costs one round trip and no database query.
* **Miss**: one database query (version, revision, key id, ciphertext, allowed hosts), one
  HPKE open, then L2 is filled in the background (never rolling the pointer back) and L1
  directly.

Whoever can write Redis can put back an old entry that is genuine (it authenticates: the
AEAD binds org, id and pointer, not time). So an entry is used only if it passes two checks
that need nothing a Redis writer controls (see "What the cache protects against" in
docs/secrets.md):

* **High-water mark**: per (org, id), the newest pointer this process has seen from a
  trusted source, a database read or an entry that authenticated (never a pub/sub message or
  a bare pointer). An entry older than it is refused (a miss, counted as ``rolled_back``).
  Bounded like L1 (LRU); a key that fell out is protected by the age check alone.
* **Sealed age**: the entry carries, inside the AEAD, the time its state was read from the
  database; an entry older than ``l2_max_age`` is refused (counted as ``expired``), and an L1
  copy of an L2 hit expires no later than the entry would. A worker that never saw the newer
  state (a fresh one, or a key evicted from the marks) can thus be handed a rolled-back state
  that was current at most ``l2_max_age`` (plus clock skew between workers) ago.

Redis down means every resolve reads the database (counted); it stays correct.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple, cast

import redis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter, Histogram
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import Row, bindparam, select
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db import Database, make_engine
from app.errors import WorkerError
from app.models import Secret
from app.observability import redact
from app.secrets import cachekeys
from app.secrets.keyring import Keyring, KeyringError
from app.secrets.sealing import CiphertextError, UnknownKeyIdError, open_sealed, secret_context

log = logging.getLogger("latchkey.resolver")

RESOLVES = Counter("latchkey_resolver_resolves_total", "Secret resolves by where they were answered", ["source"])
LATENCY = Histogram(
    "latchkey_resolver_seconds",
    "Resolve latency by source (L1 hits are not timed: the timer would cost more than the hit)",
    ["source"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0),
)
# After a Redis failure, skip the cache for this long before trying it again.
REDIS_RETRY_AFTER = 5.0

# Children bound once: looking a label up costs more than an L1 hit.
_L1_HITS = RESOLVES.labels("l1")
_L2_HITS = RESOLVES.labels("l2")
_DB_READS = RESOLVES.labels("db")
_DB_LATENCY = LATENCY.labels("db")

CACHE_ERRORS = Counter("latchkey_resolver_cache_errors_total", "Redis failures seen by the resolver", ["op"])
REFUSED = Counter(
    "latchkey_resolver_refused_entries_total",
    "Authenticated L2 entries not used: older than this process's high-water mark, or past the max age",
    ["reason"],
)
_DELETED = cachekeys.DELETED.encode()
_ROLLED_BACK = REFUSED.labels("rolled_back")
_EXPIRED = REFUSED.labels("expired")
REFILLS = Counter(
    "latchkey_resolver_refills_total",
    "First resolves after an invalidation or of a moved pointer not filled yet: read from the database for"
    " every worker, by a resolve or a refresh on the invalidation (read), answered by another worker's refill"
    " (shared), or read from the database after waiting for one in vain or finding only an entry it may not"
    " take (waited)",
    ["outcome"],
)
_REFILL_READ = REFILLS.labels("read")
_REFILL_SHARED = REFILLS.labels("shared")
_REFILL_WAITED = REFILLS.labels("waited")
# How long a refill claim lasts: longer than any wait for it, so a late resolve finds the entry
# (or the claim) instead of reading the database again; per pointer, so it never delays the next edit.
REFILL_CLAIM_MS = 10_000
# The longest single blocking pop of a refill wait (seconds): well inside the client's socket
# timeout, so a long ``refill_wait`` is waited in slices instead of timing the socket out.
_WAIT_SLICE = 0.25
# The L2 entry format (and AAD) version. v3 added the sealed time; a v2 entry is a miss.
ENTRY_FORMAT = "latchkey/l2/v3"
# An entry stamped further in the future than this (a worker's clock ahead) is refused.
CLOCK_TOLERANCE = 5.0


class SecretNotFoundError(WorkerError):
    """No such managed secret in that org (wrong org and missing look the same)."""

    code = "secret_not_found"

    def __init__(self, message: str = "secret not found") -> None:
        super().__init__(self.code, message)


class ResolverUnavailableError(WorkerError):
    """The worker cannot open secrets (no keyring); the message says what to configure."""

    code = "keyring_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)


class Resolved(NamedTuple):
    """A resolved secret. A NamedTuple: building one is on every L2 hit, and it is immutable."""

    secret_id: str
    version: int
    value: str
    allowed_hosts: tuple[str, ...]

    def __repr__(self) -> str:  # never the value
        return f"Resolved(secret_id={self.secret_id!r}, version={self.version})"


SecretRow = Row[int, int, str | None, bytes | None, list[str] | None]


def _order(ptr: str) -> tuple[int, int]:
    """A worker-written pointer ("<version>:<revision>") in the order the Lua scripts use."""
    version, _, revision = ptr.partition(":")
    return int(version), int(revision)


# The sealed time at the start of an entry's body: seconds since the epoch, a big-endian double.
_STAMP = struct.Struct(">d")


def _refillable(ptr: str) -> bool:
    """A pointer a refill can be claimed for: a current ``<version>:<revision>`` (not a tombstone,
    not a pre-revision stamp, not empty)."""
    try:
        return _order(ptr)[1] <= cachekeys.MAX_REVISION
    except ValueError:
        return False


class _Fill(NamedTuple):
    """An L2 fill for the fill thread: the state read (``resolved`` None: nothing to store) and,
    when this worker claimed that refill, the claimed pointer, whose waiters the fill wakes."""

    org_id: str
    secret_id: str
    pointer: str
    resolved: Resolved | None
    read_at: float
    claimed: str | None


class _Refresh(NamedTuple):
    """For the fill thread: read the state an invalidation named (``pointer``), whose refill this
    worker claimed when the invalidation arrived, into L1 (unless another invalidation came since
    ``generation``) and L2, waking the refill's waiters; ``done`` is set when it is over."""

    org_id: str
    secret_id: str
    pointer: str
    generation: int
    done: threading.Event


class SecretReader:
    """The miss path's single database read: one prebuilt statement, one round trip.

    Its own small pool without pre-ping (a pre-ping is a round trip per checkout; a dropped
    connection is retried once instead), and autocommit on PostgreSQL, so there is no
    BEGIN/ROLLBACK around a read that needs no transaction. Autocommit is the engine's own, not
    set per checkout: setting and resetting it on every read cost ~10% of the read's CPU.
    """

    def __init__(self, database_url: str) -> None:
        options: dict[str, Any] = {"pool_pre_ping": False, "pool_size": 4, "max_overflow": 8}
        if not database_url.startswith("sqlite"):
            options["isolation_level"] = "AUTOCOMMIT"
        self.engine = make_engine(database_url, **options)
        self.stmt = select(
            Secret.version, Secret.revision, Secret.key_id, Secret.ciphertext, Secret.allowed_hosts
        ).where(
            Secret.org_id == bindparam("org_id"), Secret.id == bindparam("secret_id"), Secret.ciphertext.is_not(None)
        )

    def read(self, org_id: str, secret_id: str) -> SecretRow | None:
        params = {"org_id": org_id, "secret_id": secret_id}
        for attempt in (1, 2):
            try:
                with self.engine.connect() as conn:
                    return conn.execute(self.stmt, params).first()
            except DBAPIError as exc:
                if attempt == 1 and exc.connection_invalidated:
                    continue  # the pool dropped a dead connection; one more try on a fresh one
                raise
        return None  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        self.engine.dispose()


class Resolver:
    def __init__(
        self,
        db: Database,
        keyring: Keyring,
        redis_client: redis.Redis | None,
        *,
        l1_size: int = 4096,
        l1_max_age: float = 30.0,
        l2_ttl: int = 600,
        l2_max_age: float = 60.0,
        marks_size: int = 16384,
        refill_wait: float = 0.05,
        listen: bool = True,
        namespace: str = "latchkey",
        keyring_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.db = db
        # Re-read on a kid the ring does not know: a rotation added a key after this process loaded it.
        self.keyring_file = keyring_file
        self._keyring_lock = threading.Lock()
        assert db.engine is not None
        self.reader = SecretReader(db.engine.url.render_as_string(hide_password=False))
        self.keyring = keyring
        self.redis = redis_client
        self.l1_size = l1_size
        self.l1_max_age = l1_max_age
        self.l2_ttl = l2_ttl
        self.l2_max_age = l2_max_age
        # ~400 bytes a key: 16,384 marks are ~6.5 MB, four times L1's default reach.
        self.marks_size = marks_size
        # After an invalidation one worker reads the database; the others wait up to this long
        # for the entry it fills before reading it themselves (see resolve()).
        self.refill_wait = refill_wait
        self.channel = cachekeys.channel(namespace)
        # (org, id) -> (monotonic deadline, value)
        self._l1: OrderedDict[tuple[str, str], tuple[float, Resolved]] = OrderedDict()
        self._l1_lock = threading.Lock()
        # L1 is only trusted while the invalidation subscription is live.
        self._l1_enabled = False
        self._generation = 0
        # Keys whose L2 entry an invalidation removed (trusted only while subscribed, like L1).
        self._l2_gone: OrderedDict[tuple[str, str], str] = OrderedDict()
        # (org, id) -> the newest pointer seen from a trusted source (see the module doc).
        # Kept whether or not L1 is on: it needs no invalidation to stay true.
        # Values are pointer strings: the common hit compares them without parsing.
        self._marks: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._aead = AESGCM(keyring.derive_key("l2-cache"))
        self._fill_script: Any = None
        self._claim_script: Any = None
        self._fills: queue.SimpleQueue[_Fill | _Refresh | None] = queue.SimpleQueue()
        # (org, id) -> (pointer, done): the refresh this worker runs since an invalidation of a
        # secret it held in L1 (see _on_invalidation); a resolve meanwhile waits for it.
        self._refreshing: dict[tuple[str, str], tuple[str, threading.Event]] = {}
        self._redis_retry_at = 0.0
        self._pubsub: Any = None
        self._fills_pending = 0  # approximate under races; only used to wait for quiescence
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if redis_client is not None:
            self._fill_script = redis_client.register_script(cachekeys.FILL_ENTRY)
            self._claim_script = redis_client.register_script(cachekeys.CLAIM_REFILL)
            self._start(self._fill_loop, "resolver-fill")
            if listen:
                self._start(self._listen_loop, "resolver-invalidations")

    # -- the one call ------------------------------------------------------------------

    def resolve(self, org_id: str, secret_id: str) -> Resolved:
        """The current value and version of a secret of ``org_id``; SecretNotFoundError otherwise."""
        k = (org_id, secret_id)
        l2_known_gone = False
        if self._l1_enabled:
            with self._l1_lock:
                hit = self._l1.get(k)
                if hit is not None and time.monotonic() < hit[0]:
                    self._l1.move_to_end(k)
                    _L1_HITS.inc()
                    return hit[1]
                gone = self._l2_gone.get(k)
                if gone == cachekeys.DELETED:
                    # Deletion is final (ids are never reused): answered without any I/O.
                    RESOLVES.labels("tombstone").inc()
                    raise SecretNotFoundError()
                l2_known_gone = gone is not None
        # An invalidation that arrives while we read must win over what we read (see _l1_put).
        generation = self._generation
        if not l2_known_gone:
            cached = self._l2_get(org_id, secret_id)
        else:
            # After an invalidation every subscribed worker misses at once: one of them reads
            # the database and fills L2, the others take its entry (no older than the state the
            # invalidation named) instead of each reading the database.
            refreshed = self._refreshed(k, cast(str, gone))
            if refreshed is not None:
                return refreshed
            cached = self._shared_refill(org_id, secret_id, cast(str, gone))
        # A pointer: this worker claimed that state's refill, and its fill wakes the waiters.
        claimed = cached if isinstance(cached, str) else None
        if cached is not None and not isinstance(cached, str):
            if l2_known_gone:
                with self._l1_lock:
                    if self._l2_gone.get(k) == gone:
                        self._l2_gone.pop(k, None)
            # The L1 copy expires no later than the entry's own max age would.
            self._l1_put(k, cached[0], generation, cached[1])
            _L2_HITS.inc()  # not timed: a histogram observation costs a tenth of the hit
            return cached[0]
        start = time.perf_counter()
        read_at = time.time()  # before the read: the state read was current at this time or later
        try:
            resolved, ptr = self._from_database(org_id, secret_id)
        except BaseException:
            if claimed is not None:
                # Nothing to fill: wake the waiters at once (to the database) rather than after their wait.
                self._queue_fill(_Fill(org_id, secret_id, claimed, None, read_at, claimed))
            raise
        finally:
            if l2_known_gone:
                with self._l1_lock:
                    self._l2_gone.pop(k, None)
        self._l1_put(k, resolved, generation)
        self._queue_fill(_Fill(org_id, secret_id, ptr, resolved, read_at, claimed))
        _DB_LATENCY.observe(time.perf_counter() - start)
        return resolved

    def cache_epoch(self) -> int | None:
        """A number that changes with every invalidation this process applies; None while L1 is off.

        Callers that keep something derived from secrets' rows (a connection's row, a parsed
        payload) keep it only while the epoch is unchanged, so it is dropped exactly when L1 is.
        """
        return self._generation if self._l1_enabled else None

    def resolve_current(self, org_id: str, secret_id: str) -> Resolved:
        """The secret as the database has it now, past both caches (which it then refreshes).

        For a caller that knows a newer version was just committed elsewhere (a connection's
        token refresh, single-flight across workers) and must not wait for the invalidation.
        """
        generation = self._generation
        read_at = time.time()
        resolved, ptr = self._from_database(org_id, secret_id)
        k = (org_id, secret_id)
        with self._l1_lock:
            self._l1.pop(k, None)
        self._l1_put(k, resolved, generation)
        self._queue_fill(_Fill(org_id, secret_id, ptr, resolved, read_at, None))
        return resolved

    # -- L1 ----------------------------------------------------------------------------

    def _l1_put(self, k: tuple[str, str], resolved: Resolved, generation: int, max_age: float | None = None) -> bool:
        """Cache ``resolved`` in L1 unless an invalidation came since ``generation``; whether it was."""
        if not self._l1_enabled:
            return False
        ttl = self.l1_max_age if max_age is None else min(max_age, self.l1_max_age)
        with self._l1_lock:
            # Any invalidation since this resolve started may concern what it read: do not
            # cache it (the next resolve reads again) rather than re-insert a stale value.
            if generation != self._generation:
                return False
            self._l1[k] = (time.monotonic() + ttl, resolved)
            self._l1.move_to_end(k)
            while len(self._l1) > self.l1_size:
                self._l1.popitem(last=False)
        return True

    def drop_local(self, org_id: str, secret_id: str, pointer: str = "") -> None:
        """An invalidation: forget the value, and remember that the shared entry is gone too."""
        self._drop(org_id, secret_id, pointer)

    def _drop(self, org_id: str, secret_id: str, pointer: str) -> tuple[bool, int]:
        """``drop_local``; whether L1 held a live copy, and the generation the drop made."""
        with self._l1_lock:
            self._generation += 1
            held = self._l1.pop((org_id, secret_id), None)
            self._l2_gone[(org_id, secret_id)] = pointer or "moved"
            while len(self._l2_gone) > self.l1_size:
                self._l2_gone.popitem(last=False)
            return held is not None and time.monotonic() < held[0], self._generation

    def _set_l1_enabled(self, enabled: bool) -> None:
        with self._l1_lock:
            self._generation += 1
            self._l1_enabled = enabled
            self._l1.clear()
            self._l2_gone.clear()

    # -- high-water marks ------------------------------------------------------------------

    def _raise_mark(self, k: tuple[str, str], ptr: str) -> bool:
        """Record a pointer from a trusted source; False if it is older than one already seen."""
        with self._l1_lock:
            seen = self._marks.get(k)
            if seen is not None and seen != ptr and _order(ptr) < _order(seen):
                return False
            self._marks[k] = ptr
            self._marks.move_to_end(k)
            while len(self._marks) > self.marks_size:
                # Forgetting a key only loses the rollback check for it; the age check remains.
                self._marks.popitem(last=False)
        return True

    # -- L2 ----------------------------------------------------------------------------

    def _aad(self, org_id: str, secret_id: str, ptr: str) -> bytes:
        return f"{ENTRY_FORMAT}|{org_id}|{secret_id}|{ptr}".encode()

    def _seal_entry(self, org_id: str, secret_id: str, ptr: str, r: Resolved, read_at: float) -> bytes:
        nonce = os.urandom(12)
        # <read at, 8 bytes> + "<host>,<host>\n<value>": host names hold neither ',' nor a
        # newline (validated), and this parses faster than JSON on the hot path.
        body = _STAMP.pack(read_at) + (",".join(r.allowed_hosts) + "\n" + r.value).encode("utf-8")
        return nonce + self._aead.encrypt(nonce, body, self._aad(org_id, secret_id, ptr))

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_retry_at

    def _redis_failed(self, op: str) -> None:
        # A circuit breaker: while Redis is down, resolves go straight to the database
        # instead of each paying a connection timeout.
        CACHE_ERRORS.labels(op).inc()
        self._redis_retry_at = time.monotonic() + REDIS_RETRY_AFTER

    def _l2_get(self, org_id: str, secret_id: str) -> tuple[Resolved, float] | str | None:
        """The L2 entry and how much longer it may be used (seconds), or None for a miss.

        A string: the pointer was found not filled and this worker claimed its refill (``_shared_refill``).
        """
        client = self.redis
        # Inlined _redis_usable(): this is the hot path of an L2 hit.
        if client is None or time.monotonic() < self._redis_retry_at:
            return None
        try:
            raw = client.get(f"{cachekeys.KEY_PREFIX}{org_id}:{secret_id}")
        except (redis.RedisError, OSError):
            self._redis_failed("get")
            return None
        raw = cast("bytes | None", raw)
        # "<pointer>\n" alone: the pointer moved and no worker has filled it yet (an edit just
        # committed, and this worker has not had its invalidation, or keeps no L1): share the
        # refill. Checked from the last byte, so an L2 hit pays no second scan of the entry.
        if raw is not None and raw.endswith(b"\n") and b"\n" not in raw[:-1] and raw[:-1] != _DELETED:
            return self._shared_refill(org_id, secret_id, raw[:-1].decode("utf-8", "replace"))
        return self._l2_open(org_id, secret_id, raw)

    def _l2_open(
        self, org_id: str, secret_id: str, raw: bytes | None, floor: tuple[int, int] | None = None
    ) -> tuple[Resolved, float] | None:
        """The entry ``raw`` (a GET of the key) if it may be used, and for how long; None for a miss.

        ``floor``: refuse an entry for an older state than this (the state an invalidation named).
        """
        if not raw:
            return None
        ptr_bytes, _, entry = raw.partition(b"\n")
        ptr = ptr_bytes.decode()
        if ptr == cachekeys.DELETED:
            RESOLVES.labels("tombstone").inc()
            raise SecretNotFoundError()
        if len(entry) < 29:  # pointer moved, entry not filled yet: a miss
            return None
        if floor is not None and _order(ptr) < floor:
            return None
        try:
            plain = self._aead.decrypt(entry[:12], entry[12:], self._aad(org_id, secret_id, ptr))
            body = plain[_STAMP.size :].decode("utf-8")
        except (InvalidTag, ValueError):
            # Another worker key (mid-rotation), an entry of an older format or a corrupt
            # entry: a miss, never an error.
            CACHE_ERRORS.labels("entry").inc()
            return None
        # Authenticated: the pointer and the body are what some worker sealed (not necessarily
        # the current state; a Redis writer can replay any genuine entry).
        left = self.l2_max_age - (time.time() - _STAMP.unpack_from(plain)[0])
        if left <= 0 or left > self.l2_max_age + CLOCK_TOLERANCE:
            _EXPIRED.inc()
            return None
        k = (org_id, secret_id)
        if self._marks.get(k) == ptr:
            # The common hit: nothing to raise, only the LRU order (lock-free: each OrderedDict
            # operation is atomic; the key may have been evicted in between, which is harmless).
            try:
                self._marks.move_to_end(k)
            except KeyError:
                pass
        elif not self._raise_mark(k, ptr):
            _ROLLED_BACK.inc()
            return None
        hosts, _, value = body.partition("\n")
        redact.register(value)  # from now on this process's logs mask it
        version = int(ptr.partition(":")[0])
        return Resolved(secret_id, version, value, tuple(hosts.split(",")) if hosts else ()), left

    def _shared_refill(self, org_id: str, secret_id: str, gone: str) -> tuple[Resolved, float] | str | None:
        """After an invalidation to state ``gone`` (or a GET finding pointer ``gone`` not filled yet): an entry another
        worker filled for it; ``gone`` when this worker claimed the refill (it reads the database
        and its fill wakes the others); None to read the database without a claim.

        One round trip (``CLAIM_REFILL``) returns the entry if it is already filled, or claims the
        refill, or counts this worker among the claimant's waiters. A waiter blocks on the wake-up
        list the claimant's fill pushes its entry to (one pop per waiter, no polling), for at
        most ``refill_wait``, then reads the database itself; so does one woken with nothing (the
        claimant stored nothing: its read failed, or the pointer moved on). The entry is checked
        as any L2 hit is (authenticated, high-water mark, sealed age), and must be for ``gone`` or
        newer: the pointer comes from a pub/sub message, which a Redis writer can forge, so it
        only ever raises the bar (a forged newer one, like a forged claim, costs the wait and a
        read; a forged wake-up is an entry like any in L2).
        """
        client = self.redis
        # An invalidation without a pointer has nothing to wait for; a pre-revision stamp is older
        # than every state: both are read.
        if not _refillable(gone):
            return None
        floor = _order(gone)
        if client is None or time.monotonic() < self._redis_retry_at:
            return None
        claim_key, waiters_key, wakeups_key = cachekeys.refill_keys(org_id, secret_id, gone)
        try:
            claim = self._claim_script(
                keys=[cachekeys.key(org_id, secret_id), claim_key, waiters_key], args=[REFILL_CLAIM_MS]
            )
        except (redis.RedisError, OSError):
            self._redis_failed("refill")
            return None
        if claim == 1:
            _REFILL_READ.inc()
            return gone
        if claim != 0:
            # Already filled. An entry refused here (older than ``gone``, or not genuine) is not
            # worth a wait: nobody is refilling ``gone`` once it looks filled.
            cached = self._l2_open(org_id, secret_id, cast(bytes, claim), floor)
            if cached is not None:
                _REFILL_SHARED.inc()
            else:
                _REFILL_WAITED.inc()
            return cached
        deadline = time.monotonic() + self.refill_wait
        while (left := deadline - time.monotonic()) >= 0.001:  # BLPOP's 0 would mean "forever"
            try:
                popped = client.blpop([wakeups_key], timeout=min(left, _WAIT_SLICE))
            except (redis.RedisError, OSError):
                self._redis_failed("refill")
                return None
            if popped is None:
                continue
            raw = cast("tuple[bytes, bytes]", popped)[1]
            if not raw:
                break  # the claimant stored nothing: read the database now
            cached = self._l2_open(org_id, secret_id, raw, floor)
            if cached is not None:
                _REFILL_SHARED.inc()
                return cached
        _REFILL_WAITED.inc()
        return None

    def _queue_fill(self, fill: _Fill | _Refresh) -> None:
        if self.redis is not None:
            self._fills_pending += 1
            self._fills.put(fill)

    def _fill_loop(self) -> None:
        # Fills run here, off the resolve path: a miss costs the database, not an extra round trip.
        while not self._stop.is_set():
            item = self._fills.get()
            if item is None:
                return
            try:
                if isinstance(item, _Refresh):
                    self._refresh(item)
                elif self._redis_usable():
                    self._write_fill(item)
            except (redis.RedisError, OSError):
                self._redis_failed("fill")
            finally:
                self._fills_pending -= 1

    def _write_fill(self, item: _Fill) -> bool:
        """Store the entry (and wake the claimed refill's waiters); whether an entry was stored."""
        keys = [cachekeys.key(item.org_id, item.secret_id)]
        if item.claimed is not None:
            keys += cachekeys.refill_keys(item.org_id, item.secret_id, item.claimed)[1:]
        blob = b""
        if item.resolved is not None and time.time() - item.read_at < self.l2_max_age:
            # Sealed here, not on the resolve path: a miss should cost only its read.
            blob = self._seal_entry(item.org_id, item.secret_id, item.pointer, item.resolved, item.read_at)
        if not blob and item.claimed is None:
            return False
        return bool(self._fill_script(keys=keys, args=[item.pointer, blob, self.l2_ttl, REFILL_CLAIM_MS]))

    # -- refresh on invalidation -------------------------------------------------------------

    def _refreshed(self, k: tuple[str, str], gone: str) -> Resolved | None:
        """The value this worker's refresh of state ``gone`` put into L1, waiting for it while it runs."""
        pending = self._refreshing.get(k)
        if pending is None or pending[0] != gone:
            return None
        pending[1].wait(self.refill_wait)
        with self._l1_lock:
            hit = self._l1.get(k) if self._l1_enabled else None
            if hit is None or time.monotonic() >= hit[0]:
                return None
        _L1_HITS.inc()
        return hit[1]

    def _refresh(self, item: _Refresh) -> None:
        k = (item.org_id, item.secret_id)
        try:
            read_at = time.time()
            resolved: Resolved | None = None
            ptr = item.pointer
            try:
                resolved, ptr = self._from_database(item.org_id, item.secret_id)
            except Exception as exc:  # not found, a database or keyring error: the next resolve reads and says
                log.debug("refresh of %s failed (%s); left to the next resolve", item.secret_id, type(exc).__name__)
            else:
                _REFILL_READ.inc()
                if self._l1_put(k, resolved, item.generation):
                    with self._l1_lock:
                        if self._l2_gone.get(k) == item.pointer:
                            self._l2_gone.pop(k, None)
            # The fill stores the entry and hands it to the waiters, or (nothing stored: the read
            # failed, or an edit moved the pointer past it) wakes them to read for themselves; then
            # the claim goes too, so the next resolve of that state claims it afresh.
            fill = _Fill(item.org_id, item.secret_id, ptr, resolved, read_at, item.pointer)
            if self._redis_usable() and self.redis is not None and not self._write_fill(fill):
                self.redis.delete(cachekeys.refill(item.org_id, item.secret_id, item.pointer))
        finally:
            self._end_refresh(k, item.done)

    def _end_refresh(self, k: tuple[str, str], done: threading.Event) -> None:
        """Wake the resolves waiting on this refresh and forget it (unless a newer one took its place)."""
        done.set()
        with self._l1_lock:
            if self._refreshing.get(k, ("", None))[1] is done:
                del self._refreshing[k]

    def flush_fills(self, timeout: float = 5.0) -> bool:
        """Wait until queued L2 fills are written (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._fills_pending and time.monotonic() < deadline:
            time.sleep(0.001)
        return not self._fills_pending

    # -- database ------------------------------------------------------------------------

    def _from_database(self, org_id: str, secret_id: str) -> tuple[Resolved, str]:
        row = self.reader.read(org_id, secret_id)
        if row is None:
            RESOLVES.labels("not_found").inc()
            raise SecretNotFoundError()
        version, revision, key_id, ciphertext, hosts = row
        assert ciphertext is not None
        context = secret_context(org_id, secret_id, version)
        try:
            try:
                plain = open_sealed(self.keyring, ciphertext, context, key_id)
            except UnknownKeyIdError:
                if not self._reload_keyring():
                    raise
                plain = open_sealed(self.keyring, ciphertext, context, key_id)
        except CiphertextError:
            # Fail closed: a row that does not open is reported, never passed on.
            log.error("secret %s of org %s does not open with this keyring", secret_id, org_id)
            raise
        _DB_READS.inc()
        value = plain.decode("utf-8")
        redact.register(value)  # from now on this process's logs mask it
        # The database is the trusted source: from now on an older entry is a rollback.
        ptr = cachekeys.pointer(version, revision)
        self._raise_mark((org_id, secret_id), ptr)
        return Resolved(secret_id, version, value, tuple(hosts or ())), ptr

    def _reload_keyring(self) -> bool:
        """Load the keyring file again (after a rotation); False if there is none or it is unusable."""
        if self.keyring_file is None:
            return False
        with self._keyring_lock:
            try:
                ring = Keyring.load(self.keyring_file)
            except KeyringError as exc:
                log.error("cannot reload the keyring: %s", exc)
                return False
            if ring.current_kid != self.keyring.current_kid:
                # A new current key derives a new L2 key: entries sealed under the old one become misses.
                self._aead = AESGCM(ring.derive_key("l2-cache"))
            self.keyring = ring
        return True

    # -- invalidations -------------------------------------------------------------------

    def _listen_loop(self) -> None:
        assert self.redis is not None
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._pubsub = self.redis.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.2)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self._set_l1_enabled(True)
                        backoff = 0.1
                    elif msg["type"] == "message":
                        self._on_invalidation(msg["data"])
            except (redis.RedisError, OSError):
                CACHE_ERRORS.labels("subscribe").inc()
            finally:
                # Without the subscription, invalidations could be missed: stop trusting L1.
                self._set_l1_enabled(False)
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_invalidation(self, data: bytes) -> None:
        """Drop the secret, acknowledge, and refresh it if it was in use here.

        A worker that held a live L1 copy will likely resolve the secret again soon: with the
        acknowledgement (same pipeline, no extra round trip) it bids for the state's refill
        (``SET NX`` of the refill claim), and the one worker that wins reads the new state at
        once, on its fill thread, into its L1 and L2, waking any worker already waiting for it.
        The next resolves find the value instead of paying for the read. Workers that did not
        hold the secret bid for nothing; a forged message for a secret held here costs one read.
        """
        try:
            msg = json.loads(data)
            org_id, secret_id, ptr = msg["o"], msg["i"], str(msg.get("p", ""))
            held, generation = self._drop(org_id, secret_id, ptr)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        nonce = msg.get("n")
        refresh = held and isinstance(org_id, str) and isinstance(secret_id, str) and _refillable(ptr)
        refresh = refresh and self._redis_usable()
        if (not nonce and not refresh) or self.redis is None:
            return
        k = (org_id, secret_id)
        done = threading.Event()
        if refresh:
            # Registered before the acknowledgement goes: a resolve here after the edit returned
            # must find the refresh (and wait for it), not bid for the refill against it.
            with self._l1_lock:
                self._refreshing[k] = (ptr, done)
        won = False
        try:
            pipe = self.redis.pipeline(transaction=False)
            if nonce:
                ack = cachekeys.ACK_PREFIX + str(nonce)
                pipe.rpush(ack, 1)
                pipe.expire(ack, 30)
            if refresh:
                pipe.set(cachekeys.refill(org_id, secret_id, ptr), "1", nx=True, px=REFILL_CLAIM_MS)
            won = bool(pipe.execute()[-1]) and refresh
        except redis.RedisError:
            CACHE_ERRORS.labels("ack").inc()
        if won:
            self._queue_fill(_Refresh(org_id, secret_id, ptr, generation, done))
        elif refresh:
            self._end_refresh(k, done)

    # -- life cycle ------------------------------------------------------------------------

    def _start(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def wait_until_listening(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._l1_enabled:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        self._fills.put(None)
        self._set_l1_enabled(False)
        self.reader.close()
        for t in self._threads:
            t.join(timeout=3)


def build_resolver(settings: Settings, db: Database, *, listen: bool = True) -> Resolver:
    """The worker's resolver; without a keyring it refuses with a message naming the setting."""
    if settings.private_keys_file is None:
        raise ResolverUnavailableError("this worker has no keyring: set LATCHKEY_PRIVATE_KEYS_FILE")
    try:
        keyring = Keyring.load(settings.private_keys_file)
    except KeyringError as exc:
        raise ResolverUnavailableError(f"LATCHKEY_PRIVATE_KEYS_FILE: {exc}") from None
    client = redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
        # Fail fast: the resolver falls back to the database rather than waiting on retries.
        retry=Retry(NoBackoff(), 0),
    )
    return Resolver(
        db,
        keyring,
        client,
        listen=listen,
        l1_max_age=settings.secret_l1_max_age_seconds,
        l2_ttl=settings.secret_cache_ttl_seconds,
        l2_max_age=settings.secret_l2_max_age_seconds,
        namespace=settings.queue,
        keyring_file=settings.private_keys_file,
    )
