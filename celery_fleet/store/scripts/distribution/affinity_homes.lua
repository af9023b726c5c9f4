-- affinity_homes: take, renew or give up the home leases of the affinity queues at once.
--
-- KEYS[i]  home of queue i-1  string  the owner id of its home worker, expiring (PX)
-- ARGV[1]  owner: this worker's id
-- ARGV[2]  the lease (ms), from now (Redis's clock)
-- ARGV[3]  one character per queue, in KEYS order: "1" this worker should be its home
--          (take it when free, renew it when ours), "0" it should not (give it up when
--          ours), "-" leave it as it is (only read its holder)
--
-- Reply: one string per queue: the owner id of its home now ("" when it has none), then
-- one more: the fewest ms left (PTTL) of a lease held by another worker ("-1": none), so
-- the caller can look again just after it lapses, unrenewed (its owner died). A queue is
-- this worker's exactly when the reply names ARGV[1]. Like lock_renew, only the
-- owner extends or deletes a lease, so a worker that stalled past its lease cannot take
-- back a queue its successor holds: it reads the successor's id instead. Running it twice
-- has the effect of once.

local owner = ARGV[1]
local lease = ARGV[2]
local want = ARGV[3]
local holders = {}
local soonest = -1
for i, key in ipairs(KEYS) do
  local flag = string.sub(want, i, i)
  local current = redis.call('GET', key)
  if flag == '1' then
    if not current or current == owner then
      redis.call('SET', key, owner, 'PX', lease)
      current = owner
    end
  elseif flag == '0' and current == owner then
    redis.call('DEL', key)
    current = false
  end
  if current and current ~= owner then
    local left = redis.call('PTTL', key)
    if left >= 0 and (soonest < 0 or left < soonest) then
      soonest = left
    end
  end
  holders[i] = current or ''
end
holders[#KEYS + 1] = tostring(soonest)
return holders
