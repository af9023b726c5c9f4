-- lock_release: give a lease up, only for its owner, and wake one waiter.
--
-- KEYS[1]  lease  hash  (see lock_acquire.lua)
-- KEYS[2]  wake   list  at most one pending wake-up; waiters block on it (BLPOP)
-- ARGV[1]  owner: the id the lease was acquired with
-- ARGV[2]  how long (ms) a wake-up nobody took stays pending
--
-- Reply: 1 released; 0 the lease is gone (it lapsed) or another owner's: nothing changes,
-- so a holder that stalled past its lease cannot release its successor's.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('LPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], 0, 0)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
