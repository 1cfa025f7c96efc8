"""The shared Redis cache layout, used by the web tier (to invalidate) and workers (to read).

One key per secret, ``lk:s:{org}:{id}``, holds ``<pointer>\\n<entry>``: the pointer names the
committed state (``<version>:<stamp>``, or ``deleted``) and the entry is that state's value,
AES-GCM encrypted under a worker-only key. A hit is therefore one GET. The web tier moves the
pointer forward after every committed change (dropping the entry); a worker fills the entry
only if the pointer still names the state it read, so a slow worker can never roll it back.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

KEY_PREFIX = "lk:s:"
ACK_PREFIX = "lk:invalidate:ack:"
DELETED = "deleted"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def channel(namespace: str) -> str:
    """The invalidation channel of one deployment (pub/sub channels span every Redis database)."""
    return f"lk:invalidate:{namespace}"


def key(org_id: str, secret_id: str) -> str:
    return f"{KEY_PREFIX}{org_id}:{secret_id}"


def pointer(version: int, updated_at: datetime) -> str:
    """The committed state of a secret: any change (value, hosts, name) gives a newer pointer."""
    stamp = (updated_at.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return f"{version}:{stamp}"


# Both scripts compare pointers as (version, stamp); "deleted" is newer than everything.
_NEWER = """
local function parse(p)
  if p == 'deleted' then return math.huge, math.huge end
  local c = string.find(p, ':', 1, true)
  if not c then return -1, -1 end
  return tonumber(string.sub(p, 1, c - 1)) or -1, tonumber(string.sub(p, c + 1)) or -1
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

# Worker: store the entry for the state it read, unless the pointer has moved past it.
FILL_ENTRY = (
    _NEWER
    + """
local cur = current(KEYS[1])
if cur and cur ~= ARGV[1] and not newer(ARGV[1], cur) then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2], 'EX', ARGV[3])
return 1
"""
)
