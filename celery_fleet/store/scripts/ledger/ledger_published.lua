-- ledger_published: the publisher tells how the publish of a run it started went.
--
-- KEYS[1]  ledger   hash    (see ledger_enqueue.lua)
-- KEYS[2]  history  stream
-- ARGV[1]  the run id ledger_enqueue answered (the publish's own token)
-- ARGV[2]  'sent': the broker took the message (the run stays queued, without a lease);
--          'failed': the publish raised (the run is undone: failed and released)
-- ARGV[3]  the error text ('failed')
-- ARGV[4]  TTL of the ledger and history (ms)
--
-- Reply: 1 when recorded; 0 when the key is no longer queued under this run (a worker
-- already claimed it, or the lease lapsed and another publish started a run): nothing changes.

--#include _lib/ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'run_id')
if f[1] ~= 'queued' or f[2] ~= ARGV[1] then
  return 0
end
if ARGV[2] == 'sent' then
  redis.call('HSET', KEYS[1], 'publish_until', 0)
  return 1
end
local now, ttl = now_ms(), tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'failed', 'released', '1', 'publish_until', 0,
  'finished', now, 'error', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
note(KEYS[2], ttl, 'event', 'publish_failed', 'run_id', ARGV[1], 'at', now)
return 1
