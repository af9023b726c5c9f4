-- ledger_finish: end this attempt's claim with its outcome.
--
-- KEYS[1]  ledger   hash
-- KEYS[2]  history  stream
-- ARGV[1]  owner (the claim's)
-- ARGV[2]  outcome: 'succeeded', 'failed', 'released' (failed and given up: may be
--          published and run again) or 'queued' (a retry or reschedule will run it again)
-- ARGV[3]  the result (JSON text, may be empty) or the error text
-- ARGV[4]  TTL of the ledger and history (ms)
--
-- Reply: 1 when recorded; 0 when the claim was no longer this owner's (it lapsed and was
-- taken over, or another copy finished first): nothing changes.

--#include _lib/ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
if f[1] ~= 'running' or f[2] ~= ARGV[1] then
  return 0
end
local now, ttl, outcome = now_ms(), tonumber(ARGV[4]), ARGV[2]
local state = outcome
if outcome == 'released' then
  state = 'failed'
end
redis.call('HSET', KEYS[1], 'state', state, 'owner', '', 'lease_until', 0, 'finished', now,
  'released', outcome == 'released' and '1' or '0')
if outcome == 'succeeded' then
  redis.call('HSET', KEYS[1], 'result', ARGV[3])
elseif outcome ~= 'queued' then
  redis.call('HSET', KEYS[1], 'error', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ttl)
note(KEYS[2], ttl, 'event', outcome, 'owner', ARGV[1], 'at', now)
return 1
