-- ledger_enqueue: record a publish of an idempotency key, unless the key is already live.
--
-- KEYS[1]  ledger   hash    state (queued|running|succeeded|failed), key, task, attempts,
--                           owner, lease_until (ms), released (1: a failure gave the key up),
--                           enqueued/started/finished (ms), result, error
-- KEYS[2]  history  stream  one entry per event of the run
-- ARGV[1]  the idempotency key
-- ARGV[2]  the task name
-- ARGV[3]  TTL of the ledger and history (ms): how long a key dedupes
--
-- Reply: {1, 'new'} when this publish is the key's first (or the key was released by a
-- failure); {0, state} when the key is already queued, running or done: publish nothing.

--#include _ledger
local state = redis.call('HGET', KEYS[1], 'state')
if state and not (state == 'failed' and redis.call('HGET', KEYS[1], 'released') == '1') then
  return {0, state}
end
local now, ttl = now_ms(), tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'state', 'queued', 'key', ARGV[1], 'task', ARGV[2],
  'enqueued', now, 'released', '0')
redis.call('PEXPIRE', KEYS[1], ttl)
note(KEYS[2], ttl, 'event', 'queued', 'at', now)
return {1, 'new'}
