-- _wake: included (not run) by scripts that wake a waiter of the line: acquire, release,
-- leave. store.script_source() puts this text where a script says "--#include _wake".
--
-- wake(waiting, prefix, id, ttl_ms, grace_until_ms): push one wake-up to ticket id's list
-- (prefix .. id, at most one pending), and shorten its ticket to grace_until_ms: a woken
-- waiter asks again within a round trip, one that does not is taken for gone.
local function wake(waiting, prefix, id, ttl_ms, grace_until_ms)
  local key = prefix .. id
  redis.call('LPUSH', key, '1')
  redis.call('LTRIM', key, 0, 0)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', waiting, 'XX', 'LT', grace_until_ms, id)
end
