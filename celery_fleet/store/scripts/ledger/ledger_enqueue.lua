-- ledger_enqueue: record a publish of an idempotency key as a new run, unless the key is live.
--
-- KEYS[1]  ledger   hash    state (queued|running|succeeded|failed), key, task, run_id (the
--                           Celery task id of the key's current run), attempts, owner,
--                           lease_until (ms: the running claim's lease), publish_until (ms: a
--                           queued run's publish lease, 0 once the publish is confirmed),
--                           released (1: a failure gave the key up),
--                           enqueued/started/finished (ms), result, error
-- KEYS[2]  history  stream  one entry per event of the key
-- ARGV[1]  the idempotency key
-- ARGV[2]  the task name
-- ARGV[3]  TTL of the ledger and history (ms): how long a key dedupes
-- ARGV[4]  the new run's id (a fresh task id, used when this publish starts a run)
-- ARGV[5]  the publish lease (ms): how long an unconfirmed publish holds the key
--
-- A key is free (this publish starts a run under ARGV[4]) when it has no record, failed and
-- was released, is queued by a publish that was never confirmed and whose lease lapsed (the
-- publisher died, or the call ran after the publisher gave up on a frozen Redis), or is
-- running under a claim whose lease lapsed (its worker died).
--
-- Reply: {1, run_id} when this publish starts a run: publish under run_id, then confirm or
-- undo (ledger_published); {0, state, run_id} when the key is live: publish nothing.

--#include _lib/ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'released', 'publish_until', 'lease_until',
  'run_id')
local state = f[1]
local now, ttl = now_ms(), tonumber(ARGV[3])
local publish_until, lease_until = tonumber(f[3]) or 0, tonumber(f[4]) or 0
local lapsed = (state == 'queued' and publish_until > 0 and publish_until <= now)
  or (state == 'running' and lease_until <= now)
if state and not lapsed and not (state == 'failed' and f[2] == '1') then
  return {0, state, f[5] or ''}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'key', ARGV[1], 'task', ARGV[2],
  'run_id', ARGV[4], 'enqueued', now, 'released', '0', 'owner', '', 'lease_until', 0,
  'publish_until', now + tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[1], ttl)
if lapsed then
  note(KEYS[2], ttl, 'event', 'queued', 'run_id', ARGV[4], 'lapsed', state, 'at', now)
else
  note(KEYS[2], ttl, 'event', 'queued', 'run_id', ARGV[4], 'at', now)
end
return {1, ARGV[4]}
