-- ledger_lost: the worker lost the process running an attempt (SIGKILL, OOM): end its claim.
--
-- Sent by the worker's main process (Celery's task_failure with WorkerLostError, when the
-- message is not redelivered), which knows the task id but not the attempt's owner token.
--
-- KEYS[1]  ledger   hash
-- KEYS[2]  history  stream
-- ARGV[1]  the lost task's id: the claim's owner must be '<task id>/...'
-- ARGV[2]  '1': release the key (release_on_failure), '0': keep it failed
-- ARGV[3]  the error text
-- ARGV[4]  TTL of the ledger and history (ms)
--
-- Reply: 1 when the claim was ended; 0 when no attempt of that task holds it.

--#include _lib/ledger
local f = redis.call('HMGET', KEYS[1], 'state', 'owner')
local prefix = ARGV[1] .. '/'
if f[1] ~= 'running' or string.sub(f[2] or '', 1, #prefix) ~= prefix then
  return 0
end
local now, ttl = now_ms(), tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'failed', 'owner', '', 'lease_until', 0,
  'finished', now, 'released', ARGV[2], 'error', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
note(KEYS[2], ttl, 'event', 'worker_lost', 'owner', f[2], 'released', ARGV[2], 'at', now)
return 1
