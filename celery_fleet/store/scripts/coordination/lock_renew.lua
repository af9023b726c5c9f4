-- lock_renew: extend a lease, only for its owner.
--
-- KEYS[1]  lease  hash  (see lock_acquire.lua)
-- ARGV[1]  owner: the id the lease was acquired with
-- ARGV[2]  the lease (ms), from now (Redis's clock)
--
-- Reply: 1 renewed; 0 the lease is gone (it lapsed) or another owner's: nothing changes,
-- so a holder that stalled past its lease cannot extend its successor's.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
