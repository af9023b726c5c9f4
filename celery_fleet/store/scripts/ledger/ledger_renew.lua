-- ledger_renew: extend the leases of running claims this process holds.
--
-- KEYS[i]  ledger hashes, one per claim
-- ARGV[i]  the owner of claim i; ARGV[#KEYS + 1] the lease (ms)
--
-- Reply: one 1 (renewed) or 0 (no longer this owner's: finished, or taken over) per claim.

--#include _lib/ledger
local now, lease = now_ms(), tonumber(ARGV[#KEYS + 1])
local out = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'state', 'owner')
  if f[1] == 'running' and f[2] == ARGV[i] then
    redis.call('HSET', key, 'lease_until', now + lease)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
