-- _lib/wake: included (not run) by scripts that wake a waiter of the line: acquire, release,
-- leave. store.script_source() puts this text where a script says "--#include _lib/wake".
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
