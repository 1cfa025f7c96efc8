"""The shared Redis cache layout, used by the web tier (to invalidate) and workers (to read).

One key per secret, ``lk:s:{org}:{id}``, holds ``<pointer>\\n<entry>``: the pointer names the
committed state (``<version>:<revision>``, or ``deleted``) and the entry is that state's value,
AES-GCM encrypted under a worker-only key. A hit is therefore one GET. The web tier moves the
pointer forward after every committed change (dropping the entry); a worker fills the entry
only if the pointer still names the state it read, so a slow worker can never roll it back.

``revision`` is a database counter (``secrets.revision``, bumped in SQL by every committed
change), so the order of pointers never depends on a web host's clock. Pointers written
before it (``<version>:<microseconds since the epoch>``) are recognised by their stamp, which
no 32-bit revision can reach, and order before every current pointer, so an upgrade never
leaves a key stuck behind a wall-clock stamp.

The pointer order only keeps honest writers in step: whoever can write Redis can set any
pointer and any old entry. What a worker trusts of an entry is decided by the resolver (its
high-water marks and the entry's sealed age), see ``docs/secrets.md``.
"""

from __future__ import annotations

KEY_PREFIX = "lk:s:"
ACK_PREFIX = "lk:invalidate:ack:"
# ``lk:r:{org}:{id}:{pointer}``: the worker that set it reads the database for that state (after
# an invalidation, or on finding the pointer not filled); every other worker takes the entry it
# fills (the resolver's single-flight refill). Beside it ``...:w`` counts the workers waiting for
# that fill and ``...:n`` is the list their blocking pops wait on: the fill pushes its entry there
# once for each of them.
REFILL_PREFIX = "lk:r:"
# Most wake-ups one fill pushes: the count is a Redis value, and a forged one must not make a
# fill loop for long. Far above any fleet's worker count; a waiter not woken waits its bound out.
MAX_WAKEUPS = 1024
DELETED = "deleted"
# The largest revision a pointer can carry (``secrets.revision`` is a 32-bit INTEGER); a larger
# stamp is a pre-revision wall-clock stamp (microseconds), older than every current pointer.
MAX_REVISION = 2**31 - 1


def channel(namespace: str) -> str:
    """The invalidation channel of one deployment (pub/sub channels span every Redis database)."""
    return f"lk:invalidate:{namespace}"


def key(org_id: str, secret_id: str) -> str:
    return f"{KEY_PREFIX}{org_id}:{secret_id}"


def refill(org_id: str, secret_id: str, pointer: str) -> str:
    return f"{REFILL_PREFIX}{org_id}:{secret_id}:{pointer}"


def refill_keys(org_id: str, secret_id: str, pointer: str) -> list[str]:
    """The refill claim of a state, its count of waiting workers and the list they wait on."""
    claim = refill(org_id, secret_id, pointer)
    return [claim, claim + ":w", claim + ":n"]


def pointer(version: int, revision: int) -> str:
    """The committed state of a secret: any change (value, hosts, name) gives a newer pointer."""
    return f"{version}:{revision}"


# Both scripts compare pointers as (version, revision); "deleted" is newer than everything,
# a pre-revision (wall-clock) or unparsable pointer older than everything.
_NEWER = (
    """
local function parse(p)
  if p == 'deleted' then return math.huge, math.huge end
  local c = string.find(p, ':', 1, true)
  if not c then return -1, -1 end
  local v, s = tonumber(string.sub(p, 1, c - 1)), tonumber(string.sub(p, c + 1))
  if not v or not s or s > """
    + str(MAX_REVISION)
    + """ then return -1, -1 end
  return v, s
end
local function newer(a, b)
  local av, as = parse(a)
  local bv, bs = parse(b)
  if av ~= bv then return av > bv end
  return as > bs
end
local function current(k)
  local cur = redis.call('GET', k)
  if not cur then return nil end
  local nl = string.find(cur, '\\n', 1, true)
  if nl then return string.sub(cur, 1, nl - 1) end
  return cur
end
"""
)

# Web tier: move the pointer forward (never back), dropping any entry.
MOVE_POINTER = (
    _NEWER
    + """
local cur = current(KEYS[1])
if cur and not newer(ARGV[1], cur) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '\\n', 'EX', ARGV[2])
return 1
"""
)

# Worker: store the entry for the state it read (ARGV[1], ARGV[2]; none when ARGV[2] is empty),
# unless the pointer has moved past it. A worker that claimed a refill also passes that state's
# waiter count and wake-up list (KEYS[2], KEYS[3]; refill_keys) and their lifetime (ARGV[4] ms):
# each waiter counted gets the stored entry pushed to it, or an empty wake-up when nothing was
# stored (the pointer moved on, or the claimant's read failed), which sends it to the database.
FILL_ENTRY = (
    _NEWER
    + """
local filled = 0
if ARGV[2] ~= '' then
  local cur = current(KEYS[1])
  if not cur or cur == ARGV[1] or newer(ARGV[1], cur) then
    redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'EX', ARGV[3])
    filled = 1
  end
end
if KEYS[2] then
  local waiting = math.min(tonumber(redis.call('GET', KEYS[2])) or 0, """
    + str(MAX_WAKEUPS)
    + """)
  if waiting > 0 then
    redis.call('DEL', KEYS[2])
    local wake = ''
    if filled == 1 then wake = ARGV[1] .. '\\n' .. ARGV[2] end
    for _ = 1, waiting do redis.call('RPUSH', KEYS[3], wake) end
    redis.call('PEXPIRE', KEYS[3], ARGV[4])
  end
end
return filled
"""
)

# Worker, after an invalidation: the entry if it is already filled (the caller checks it);
# otherwise 1 if this worker now holds the refill of that state (KEYS[2], for ARGV[1] ms), or 0
# when another worker does: then this one is counted as waiting (KEYS[3]) and blocks on the
# wake-up list its claimant's fill pushes to. One round trip whichever way it goes.
CLAIM_REFILL = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local nl = string.find(cur, '\\n', 1, true)
  if nl and nl < #cur then return cur end
end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 1 end
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return 0
"""
