-- empty_missing: after an outage, start the windows Redis no longer has as empty buckets.
--
-- A Redis that restarted empty would otherwise answer the first asks of the whole fleet
-- with full buckets: a burst on top of what the local limiters admitted meanwhile.
--
-- KEYS[1]  ctl  hash  the limit's state (see acquire.lua): window field -> GCRA arrival time
-- ARGV     pairs of window field ("r:60") and its tolerance tau (ms)
--
-- Reply: how many windows were missing (and now start empty). Present ones are untouched.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[1], ARGV[i], now + tonumber(ARGV[i + 1]))
    n = n + 1
  end
end
if n > 0 and redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], 86400000)
end
return n
