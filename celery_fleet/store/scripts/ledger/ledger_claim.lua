-- ledger_claim: may this attempt run the key's body? Takes a lease on it when it may.
--
-- KEYS[1]  ledger   hash    (see ledger_enqueue.lua)
-- KEYS[2]  history  stream
-- ARGV[1]  owner: this attempt's id (unique per execution)
-- ARGV[2]  lease (ms): the claim lapses unless renewed within it
-- ARGV[3]  TTL of the ledger and history (ms)
-- ARGV[4]  the idempotency key
-- ARGV[5]  the task name
-- ARGV[6]  '1': singleton (at most one running; a finished key may run again)
-- ARGV[7]  the attempt's task id: the key's run id when the record has none (its ledger
--          was lost while the message waited)
--
-- Reply: {'done', result} (succeeded: do not run, return the stored result);
-- {'failed', error} (failed and kept: do not run); {'busy', ms} (running under a live lease
-- elsewhere: wait that long at most); {'run', attempts, taken_over} (run it: attempts counts
-- this one; taken_over = 1 when a lapsed lease of another owner was taken).

--#include _lib/ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'owner', 'lease_until', 'released',
  'result', 'error')
local state, owner, until_ms = f[1], f[2], tonumber(f[3]) or 0
local now, ttl = now_ms(), tonumber(ARGV[3])
local singleton = ARGV[6] == '1'
if state == 'succeeded' and not singleton then
  return {'done', f[5] or ''}
end
if state == 'failed' and f[4] ~= '1' and not singleton then
  return {'failed', f[6] or ''}
end
local taken = 0
if state == 'running' and owner ~= ARGV[1] then
  if until_ms > now then
    return {'busy', until_ms - now}
  end
  taken = 1
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[1],
  'lease_until', now + tonumber(ARGV[2]), 'started', now, 'key', ARGV[4], 'task', ARGV[5],
  'publish_until', 0)
redis.call('HSETNX', KEYS[1], 'run_id', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ttl)
note(KEYS[2], ttl, 'event', taken == 1 and 'taken_over' or 'running', 'attempt', attempts,
  'owner', ARGV[1], 'at', now)
return {'run', attempts, taken}
