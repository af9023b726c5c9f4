-- _lib/line: included (not run) by acquire, release, release_lean and leave: the line of
-- waiters.
-- store.script_source() puts this text where a script says "--#include _lib/line".
--
-- A limit's line is two zsets: line (ticket id -> order key: lane * 2^42 + first-asked
-- ms, oldest first) and waiting (ticket id -> expiry, ms: a ticket is a lease on a place).
--
-- Wake-ups go to one list per process, not per ticket: a ticket id starts with its
-- process's tag (its first 8 characters, see decision.new_lease_id), and the list
-- prefix .. tag is where that process's one listener blocks (wakeups.py). The element is
-- the ticket id.
--
-- wake(waiting, prefix, id, ttl_ms, grace_until_ms): push one wake-up for ticket id onto
-- its process's list, and shorten its ticket to grace_until_ms: a woken waiter asks again
-- within a round trip, one that does not is taken for gone.
local function wake_list(prefix, id)
  return prefix .. string.sub(id, 1, 8)
end

local function wake(waiting, prefix, id, ttl_ms, grace_until_ms)
  local key = wake_list(prefix, id)
  redis.call('LREM', key, 0, id)  -- at most one pending per ticket
  redis.call('RPUSH', key, id)
  redis.call('LTRIM', key, -4096, -1)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', waiting, 'XX', 'LT', grace_until_ms, id)
end

-- line_sweep(line, waiting, now, most): drop up to `most` tickets whose holder stopped
-- asking (expired in waiting) from both zsets; returns how many were dropped.
local function line_sweep(line, waiting, now, most)
  local dead = redis.call('ZRANGEBYSCORE', waiting, '-inf', now, 'LIMIT', 0, most)
  if #dead > 0 then
    redis.call('ZREM', line, unpack(dead))
    redis.call('ZREM', waiting, unpack(dead))
  end
  return #dead
end

-- wake_next(line, leases, waiting, prefix, now, cap, ttl_ms, grace_ms): what a release
-- that gave a lease back does for the line (the caller found it non-empty): sweep the
-- tickets of holders gone, and when the release left room under the in-flight cap (0: no
-- cap, no in-flight waiters: such a line moves on admissions), wake the first waiter in
-- (lane priority, age) order: a higher lane's ticket before any lower one's.
local function wake_next(line, leases, waiting, prefix, now, cap, ttl_ms, grace_ms)
  line_sweep(line, waiting, now, 16)
  if cap > 0 and redis.call('ZCARD', leases) < cap then
    local head = redis.call('ZRANGE', line, 0, 0)[1]
    if head then wake(waiting, prefix, head, ttl_ms, now + grace_ms) end
  end
end
